"""Record transformers' float32 logits for the tiny configs that qlora_np accepts (a plain Llama and
the related ones it computes too; the rope-scaled one on 1,100 positions as well):
tests/test_architectures.py checks ours against them, and live when torch is there.

Each case is the tiny Llama of tests/test_llama.py (its weights, seed 0, untied head) saved as a
Hugging Face folder whose config.json is edited as the case says; transformers loads the folder
and runs the ids below. Run from the repository root with torch and transformers installed:

    python tests/data/architectures/make_architecture_vectors.py
"""

import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from tests.test_architectures import _cases, transformers_logits, write_case  # noqa: E402


def main():
    import torch
    import transformers

    recorded = {}
    with tempfile.TemporaryDirectory() as scratch:
        for case, ids in _cases():
            name = case.removesuffix("_long")
            folder = pathlib.Path(scratch) / case
            write_case(folder, name)
            recorded[case] = transformers_logits(folder, ids)
    out = pathlib.Path(__file__).with_name("accepted_logits.npz")
    np.savez(out, torch_version=torch.__version__, transformers_version=transformers.__version__,
             **recorded)
    print(f"wrote {out}: {', '.join(recorded)}")


if __name__ == "__main__":
    main()
