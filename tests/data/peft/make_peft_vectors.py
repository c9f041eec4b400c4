"""Record a PEFT-saved LoRA adapter on a tiny Llama, and PEFT's outputs with it (tests/test_peft_io.py).

Needs torch, transformers and peft (recorded with torch 2.13.0+cpu, transformers 5.24.0,
peft 0.21.2); qlora_np is not used. Usage, from the repository root:
    python tests/data/peft/make_peft_vectors.py
Writes, next to this script:
  base/config.json, base/model.safetensors   the tiny LlamaForCausalLM (random weights, untied head)
  adapter/adapter_config.json, adapter/adapter_model.safetensors   as peft's save_pretrained writes them
  outputs.npz   ids (2, 7), logits of the base model and of the adapted model (2, 7, vocab)
The adapter has every kind of scale: r 4 with lora_alpha 8 and rsLoRA, a rank_pattern
(v_proj: r 2) and an alpha_pattern (down_proj: 3); its B matrices are random (PEFT
starts them at zero), so the adapters change the logits.
"""

import pathlib

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

HERE = pathlib.Path(__file__).parent


def main():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, rope_theta=10000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():                     # larger weights than the default init: larger effects
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 1.0 / np.sqrt(parameter.shape[1]))
    model.save_pretrained(HERE / "base", safe_serialization=True)
    ids = torch.tensor([[5, 1, 33, 7, 20, 9, 2], [0, 39, 12, 12, 8, 30, 17]])
    with torch.no_grad():
        base_logits = model(ids).logits.numpy()
    lora = LoraConfig(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                      rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    peft_model = get_peft_model(model, lora).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
        logits = peft_model(ids).logits.numpy()
    peft_model.save_pretrained(HERE / "adapter")
    (HERE / "adapter" / "README.md").unlink()                  # peft's empty model-card template
    (HERE / "base" / "generation_config.json").unlink()
    np.savez_compressed(HERE / "outputs.npz", ids=ids.numpy(), base_logits=base_logits, logits=logits)
    print("max |logit change| from the adapters:", float(np.abs(logits - base_logits).max()))


if __name__ == "__main__":
    main()
