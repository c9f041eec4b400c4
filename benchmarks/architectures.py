"""The architecture matrix: which Hugging Face architectures qlora_np computes as transformers + PEFT
do, which it refuses, and how far off it is.

    python benchmarks/architectures.py [--live] [--markdown]

One row per case of tests/architecture_cases.py (the tests' case list and comparisons): the
architecture (model_type), what the case exercises, and the result:

* "right", with the largest logit error (16 positions, 1,100 through the KV cache, the Hub-style
  config, with the PEFT adapter) and the largest relative gradient error of the adapters (16 and
  1,100 positions), all within the tests' tolerances;
* "refused: <message>": the model raised UnsupportedModelError (for a case of the REFUSED list,
  with a message the tests accept: see architecture_cases.refusal_pattern);
* "WRONG: <errors>": numbers past the tolerances, or a REFUSED case loaded or refused for
  another reason; "error: <type>: <message>" for any other exception.

Exit status 1 if any row is WRONG or an error. The references are the recorded ones
(tests/data/architectures/models/<case>/reference.npz); ``--live`` computes them again with torch,
transformers and PEFT from the same saved models. ``--markdown`` prints the README's
supported-models table instead.
"""

import argparse
import importlib.util
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_np import runtime  # noqa: E402

runtime.configure()              # the CLI's process settings, before NumPy loads OpenBLAS

import numpy as np  # noqa: E402

from qlora_np.errors import UnsupportedModelError  # noqa: E402
from qlora_np.models.llama.model import LlamaModel  # noqa: E402
from tests.architecture_cases import (ARCHITECTURES, CASES, GRADIENT_RTOL, IDS, LOGIT_ATOL,  # noqa: E402
                                      LONG_IDS, REFUSED, config_of, gradient_errors, load_ours, max_error,
                                      model_folder, our_gradients, our_long_rows, recorded,
                                      recorded_gradients, refusal_pattern, write_hub_folder)


def case_errors(case, reference):
    """(largest logit error, largest relative gradient error, the checks past their tolerance)."""
    model = load_ours(case)
    with tempfile.TemporaryDirectory() as scratch:
        hub = LlamaModel.from_hf(write_hub_folder(case, scratch), quant_type=None).forward(np.array(IDS))
    logits = {"logits": max_error(model.forward(np.array(IDS)), reference["logits"]),
              "long logits": max_error(our_long_rows(model), reference["long"]),
              "hub config logits": max_error(hub, reference["logits"]),
              "PEFT logits": max_error(load_ours(case, adapter=True).forward(np.array(IDS)),
                                       reference["peft_logits"])}
    gradients = {f"gradients at {len(ids):,}":
                 max(gradient_errors(our_gradients(case, ids), recorded_gradients(reference, which)).values())
                 for which, ids in (("grad16", IDS), ("grad_long", LONG_IDS))}
    wrong = [f"{name} {error:.2g}" for name, error in logits.items() if not error <= LOGIT_ATOL]
    wrong += [f"{name} {error:.2g} (relative)" for name, error in gradients.items()
              if not error <= GRADIENT_RTOL]
    return max(logits.values()), max(gradients.values()), wrong


def short(error, case):
    """An error's message without the case's folder."""
    folder = model_folder(case)
    return str(error).replace(f"{folder}/config.json: ", "").replace(f"{folder}: ", "")


def supported_row(case, live):
    """(status, result, logit error, gradient error) of a case the model should compute."""
    try:
        reference = live_reference(case) if live else recorded(case)
        logit, gradient, wrong = case_errors(case, reference)
    except UnsupportedModelError as error:
        return "refused", f"refused: {short(error, case)}", None, None
    except Exception as error:                   # the matrix reports it and goes on to the next case
        return "error", f"error: {type(error).__name__}: {short(error, case)}", None, None
    if wrong:
        return "WRONG", "WRONG: " + ", ".join(wrong), logit, gradient
    return "right", f"right: logits within {logit:.1e}, gradients within {gradient:.1e} (relative)", \
        logit, gradient


def refused_row(case):
    """(status, result) of a case the model must refuse."""
    try:
        LlamaModel.from_hf(model_folder(case), quant_type=None)
    except UnsupportedModelError as error:
        if not re.search(refusal_pattern(case), str(error)):
            return "WRONG", f"WRONG: refused without naming {REFUSED[case].match!r}: {short(error, case)}"
        return "refused", f"refused: {short(error, case)}"
    except Exception as error:
        return "error", f"error: {type(error).__name__}: {short(error, case)}"
    return "WRONG", f"WRONG: loaded; must be refused ({REFUSED[case].match!r})"


def live_reference(case):
    """The reference computed now with torch (see architecture_cases.transformers_reference)."""
    from tests.architecture_cases import transformers_reference

    return transformers_reference(case)


def rows(live):
    """One dict per case: case, architecture, model_type, exercises, status, result and errors."""
    for case in [*CASES, *REFUSED]:
        model_type = config_of(case)["model_type"]
        if case in CASES:
            status, result, logit, gradient = supported_row(case, live)
        else:
            (status, result), logit, gradient = refused_row(case), None, None
        yield {"case": case, "architecture": ARCHITECTURES[model_type], "model_type": model_type,
               "exercises": (CASES.get(case) or REFUSED[case]).exercises, "status": status, "result": result,
               "logit": logit, "gradient": gradient}


def markdown(table):
    """The supported-models table of the README."""
    lines = ["| Architecture | HF model_type | Case | What it exercises | Status | Max logit error | "
             "Max relative gradient error |", "|---|---|---|---|---|---|---|"]
    for row in table:
        errors = [f"{row[key]:.1e}" if row[key] is not None else "" for key in ("logit", "gradient")]
        lines.append(f"| {row['architecture']} | `{row['model_type']}` | {row['case']} | "
                     f"{row['exercises']} | {row['status']} | {errors[0]} | {errors[1]} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", action="store_true", help="compute the references now with torch")
    parser.add_argument("--markdown", action="store_true", help="print the README's table")
    args = parser.parse_args()
    missing = [name for name in ("torch", "transformers", "peft") if importlib.util.find_spec(name) is None]
    if args.live and missing:
        sys.exit(f"--live needs torch, transformers and peft; missing: {', '.join(missing)}")
    table = []
    for row in rows(args.live):
        table.append(row)
        if not args.markdown:
            print(f"{row['case']:<22} {row['architecture'] + ' (' + row['model_type'] + ')':<28} "
                  f"{row['exercises']}\n{'':<22} {row['result']}", flush=True)
    if args.markdown:
        print(markdown(table))
    failed = [row["case"] for row in table if row["status"] in ("WRONG", "error")]
    if failed:
        print(f"\nwrong or failing: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
