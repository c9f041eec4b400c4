"""Write the architecture matrix's models and their transformers + PEFT twins (see
tests/architecture_cases.py) into tests/data/architectures/models/<case>/.

For every case of CASES:
1. build transformers' model of the config (seeded; norms and biases perturbed), save_pretrained it
   (float32 safetensors) and write the case's own config as hub_config.json, checking that
   transformers reads that one into the same model;
2. wrap it with PEFT LoRA (r 4, alpha 8, every linear layer, random non-zero A and B) and save
   the adapter with PeftModel.save_pretrained into adapter/;
3. record reference.npz from the saved files (architecture_cases.transformers_reference), after
   checking that it can tell each contrast apart and that no gradient is zero.
For every case of REFUSED only step 1's model (without hub_config.json).

Run from the repository root with torch, transformers and peft installed:

    python tests/data/architectures/make_model_vectors.py [case ...]
"""

import json
import pathlib
import shutil
import sys
import tempfile
import zlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from tests.architecture_cases import (CASES, CONTRAST_MIN, IDS, REFUSED, adapter_folder,  # noqa: E402
                                      build_transformers_model, config_of, load_transformers, model_folder,
                                      random_peft_model, recorded_gradients, transformers_logits,
                                      transformers_reference, write_hub_folder)


def write_model(case):
    """Step 1: the seeded model saved as a Hugging Face folder; returns it."""
    folder = model_folder(case)
    shutil.rmtree(folder, ignore_errors=True)
    model = build_transformers_model(case, seed=zlib.crc32(case.encode()))
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)       # nothing the forward reads
    return model


def check_hub_config(case, model):
    """hub_config.json: the case's config as written in CASES, which transformers must read into the
    model that save_pretrained's config.json gives."""
    folder = model_folder(case)
    hub = {"architectures": [type(model).__name__], **config_of(case)}
    (folder / "hub_config.json").write_text(json.dumps(hub, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as scratch:
        hub_model = load_transformers(write_hub_folder(case, scratch))
        np.testing.assert_array_equal(transformers_logits(hub_model, IDS),
                                      transformers_logits(load_transformers(folder), IDS))


def check_reference(case, reference):
    """Every contrast lies CONTRAST_MIN or more from the reference; no gradient is all zero."""
    for name in CASES[case].contrasts:
        apart = max(np.abs(reference[f"contrast/{name}/{part}"] - reference[part]).max()
                    for part in ("logits", "long"))
        assert apart > CONTRAST_MIN, f"{case}: contrast {name!r} is only {apart:.2g} from the reference"
    for which in ("grad16", "grad_long"):
        zero = [key for key, grad in recorded_gradients(reference, which).items() if not np.abs(grad).max()]
        assert not zero, f"{case}: zero gradients at {which}: {zero}"


def main(cases):
    for case in cases:
        model = write_model(case)
        if case in REFUSED:
            print(f"{case}: model only")
            continue
        check_hub_config(case, model)
        random_peft_model(model, seed=zlib.crc32(case.encode()) + 1).save_pretrained(adapter_folder(case))
        (adapter_folder(case) / "README.md").unlink()                    # PEFT's model card template
        reference = transformers_reference(case)
        check_reference(case, reference)
        np.savez_compressed(model_folder(case) / "reference.npz", **reference)
        print(f"{case}: {len(reference)} arrays")


if __name__ == "__main__":
    main(sys.argv[1:] or [*CASES, *REFUSED])
