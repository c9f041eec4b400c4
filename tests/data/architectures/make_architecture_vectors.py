"""Record transformers' float32 logits for the tiny configs that qlora_np accepts besides a plain
Llama (tests/test_architectures.py checks ours against them, live when torch is there).

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

from tests.test_architectures import ACCEPTED, IDS, write_case  # noqa: E402


def transformers_logits(folder):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)[None]).logits[0].numpy()


def main():
    import torch
    import transformers

    recorded = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in ACCEPTED:
            folder = pathlib.Path(scratch) / name
            write_case(folder, name)
            recorded[name] = transformers_logits(folder)
    out = pathlib.Path(__file__).with_name("accepted_logits.npz")
    np.savez(out, torch_version=torch.__version__, transformers_version=transformers.__version__,
             **recorded)
    print(f"wrote {out}: {', '.join(recorded)}")


if __name__ == "__main__":
    main()
