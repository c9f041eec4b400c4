"""One Llama model, two naming schemes: GGUF's (``blk.N.attn_q.weight``, adjacent-pair RoPE rows)
and Hugging Face's (``model.layers.N.self_attn.q_proj.weight``, rotate-half rows).

The model keeps GGUF names and row order; every reader and writer of HF files maps through here.
"""

import numpy as np

from qlora_np.errors import CheckpointError
from qlora_np.models.llama.support import check_shapes, check_tensors


LINEAR_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


HF_LINEAR_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                   "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj"}


GGUF_TO_HF_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                    "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


GGUF_TO_HF_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def gguf_tensor_names(config, tied):
    """Every tensor a Llama GGUF of ``config`` holds, no more: with ``output.weight`` unless
    the LM head is ``tied`` to the embedding."""
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    return names + [f"blk.{layer}.{kind}.weight" for layer in range(config.num_layers)
                    for kind in (*LINEAR_NAMES, *GGUF_TO_HF_NORMS)]


def gguf_tensor_shapes(config, tied):
    """Name → NumPy shape ((out, in) for a linear weight) of every tensor of :func:`gguf_tensor_names`."""
    h, f, kv = config.hidden_size, config.intermediate_size, config.num_kv_heads * config.head_dim
    linear = {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
              "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f), "attn_norm": (h,), "ffn_norm": (h,)}
    special = {"token_embd.weight": (config.vocab_size, h), "output_norm.weight": (h,),
               "output.weight": (config.vocab_size, h)}
    return {name: special.get(name) or linear[name.split(".")[2]] for name in gguf_tensor_names(config, tied)}


def hf_tensor_names(config, tied):
    """The Hugging Face names of :func:`gguf_tensor_names`."""
    return [gguf_to_hf_name(name, config)[0] for name in gguf_tensor_names(config, tied)]


def hf_buffers(names):
    """The names among ``names`` that hold no weight: older checkpoints saved each layer's RoPE
    ``rotary_emb.inv_freq``, which the model computes from rope_theta instead."""
    return {name for name in names if name.endswith(".rotary_emb.inv_freq")}


def hf_to_gguf_weights(tensors, config, source=""):
    """Hugging Face Llama tensor names and q/k row order → GGUF names and order (float32 arrays).

    A tensor the model would not read (a bias, a q/k norm, …) raises UnsupportedModelError."""
    source = source or "checkpoint"
    tied = "lm_head.weight" not in tensors
    check_tensors(set(tensors) - hf_buffers(tensors), hf_tensor_names(config, tied), source)
    expected = gguf_tensor_shapes(config, tied)
    check_shapes({name: tensors[name].shape for name in tensors},
                 {gguf_to_hf_name(name, config)[0]: shape for name, shape in expected.items()}, source)
    weights = {}
    for name in expected:
        hf_name, heads = gguf_to_hf_name(name, config)
        weight = np.asarray(tensors[hf_name], np.float32)
        weights[name] = weight if heads is None else permute_rope_rows(weight, heads)
    return weights


def gguf_to_hf_name(name, config):
    """A Llama GGUF tensor name → (its Hugging Face name, the head count whose rows HF orders
    for rotate-half RoPE (q and k), else None): the one name map both directions read."""
    if name in GGUF_TO_HF_NAMES:
        return GGUF_TO_HF_NAMES[name], None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        layer, kind = f"model.layers.{int(parts[1])}.", parts[2]
        if kind in GGUF_TO_HF_NORMS:
            return f"{layer}{GGUF_TO_HF_NORMS[kind]}.weight", None
        if kind in HF_LINEAR_NAMES:
            return f"{layer}{HF_LINEAR_NAMES[kind]}.weight", rope_heads(config, kind)
    raise CheckpointError(f"{name!r} is not a tensor of a plain Llama model (no Hugging Face name for it)")


def rope_heads(config, name):
    """The head count whose rows HF and GGUF order differently for linear layer ``name``
    (q: the heads, k: the kv heads), else None (the other layers' rows agree)."""
    return {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}.get(name)


def permute_rope_rows(weight, heads):
    """HF rotate-half row order → GGUF adjacent-pair order within each head (q or k weight, or a LoRA B)."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rope_rows(weight, heads):
    """GGUF adjacent-pair row order → HF rotate-half order (the inverse of :func:`permute_rope_rows`)."""
    out = weight.shape[0]
    return weight.reshape(heads, out // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
