"""Record a whole-model 4-bit checkpoint as transformers + bitsandbytes save it (tests/test_bnb_io.py).

Needs torch, transformers and bitsandbytes (recorded with torch 2.13.0+cpu, transformers
5.24.0, bitsandbytes 0.50.2, on the CPU); qlora_np is not used. Usage, from the
repository root:
    python tests/data/bnb_model/make_bnb_model_vectors.py
Loads the tiny Llama of tests/data/peft/base with ``load_in_4bit`` (NF4, double quant),
saves it with ``save_pretrained`` into ``checkpoint/`` (config.json with its
quantization_config, model.safetensors in the HF + bitsandbytes key layout), and saves the
4-bit model's logits for two rows of ids in ``outputs.npz``.
"""

import pathlib

import numpy as np
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

HERE = pathlib.Path(__file__).parent
BASE = HERE.parent / "peft" / "base"


def main():
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(BASE, quantization_config=quantization, device_map="cpu",
                                             dtype=torch.float32).eval()
    ids = torch.tensor([[5, 1, 33, 7, 20, 9, 2], [0, 39, 12, 12, 8, 30, 17]])
    with torch.no_grad():
        logits = model(ids).logits.float().numpy()
    model.save_pretrained(HERE / "checkpoint")
    (HERE / "checkpoint" / "generation_config.json").unlink(missing_ok=True)
    np.savez_compressed(HERE / "outputs.npz", ids=ids.numpy(), logits=logits)
    print("saved", sorted(p.name for p in (HERE / "checkpoint").iterdir()))


if __name__ == "__main__":
    main()
