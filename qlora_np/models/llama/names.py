"""One Llama-family model, two naming schemes: GGUF's (``blk.N.attn_q.weight``, adjacent-pair RoPE rows)
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


GGUF_TO_HF_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
"""A block's norms' Hugging Face names (without post_norms: Llama's two, and Qwen3's q/k norms)."""

GGUF_TO_HF_POST_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                         "ffn_norm": "pre_feedforward_layernorm", "ffn_post_norm": "post_feedforward_layernorm",
                         "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
"""The same with post_norms (Gemma 2/3), where post_attention_layernorm is the norm after attention."""


def block_norm_names(config):
    """The GGUF names of the norms each block of ``config`` has, in the forward's order."""
    names = ["attn_norm"] + ["attn_q_norm", "attn_k_norm"] * config.qk_norm
    names += ["attn_post_norm"] * config.post_norms + ["ffn_norm"] + ["ffn_post_norm"] * config.post_norms
    return names


def gguf_tensor_names(config, tied):
    """Every tensor a GGUF of ``config`` holds, no more: with ``output.weight`` unless the LM
    head is ``tied`` to the embedding, each block's biases and extra norms as the config says."""
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    for layer in range(config.num_layers):
        names += [f"blk.{layer}.{kind}.weight" for kind in (*LINEAR_NAMES, *block_norm_names(config))]
        names += [f"blk.{layer}.{kind}.bias" for kind in config.biases]
    return names


def gguf_tensor_shapes(config, tied):
    """Name → NumPy shape ((out, in) for a linear weight) of every tensor of :func:`gguf_tensor_names`."""
    h, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    linear = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
              "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    norms = {"attn_q_norm": (hd,), "attn_k_norm": (hd,)}
    special = {"token_embd.weight": (config.vocab_size, h), "output_norm.weight": (h,),
               "output.weight": (config.vocab_size, h)}

    def shape(name):
        if name in special:
            return special[name]
        kind, part = name.split(".")[2:]
        if part == "bias":
            return linear[kind][:1]
        return linear.get(kind) or norms.get(kind, (h,))
    return {name: shape(name) for name in gguf_tensor_names(config, tied)}


def hf_tensor_names(config, tied):
    """The Hugging Face names of :func:`gguf_tensor_names`."""
    return [gguf_to_hf_name(name, config)[0] for name in gguf_tensor_names(config, tied)]


def hf_buffers(names):
    """The names among ``names`` that hold no weight: older checkpoints saved each layer's RoPE
    ``rotary_emb.inv_freq``, which the model computes from rope_theta instead."""
    return {name for name in names if name.endswith(".rotary_emb.inv_freq")}


def hf_to_gguf_weights(tensors, config, source=""):
    """Hugging Face tensor names, q/k row order and norm convention → GGUF's (float32 arrays).

    A tensor the model would not read (a bias, a q/k norm, …) raises UnsupportedModelError."""
    source = source or "checkpoint"
    tied = "lm_head.weight" not in tensors
    check_tensors(set(tensors) - hf_buffers(tensors), hf_tensor_names(config, tied), source)
    expected = gguf_tensor_shapes(config, tied)
    check_shapes({name: tensors[name].shape for name in tensors},
                 {gguf_to_hf_name(name, config)[0]: shape for name, shape in expected.items()}, source)
    return {name: from_hf_values(name, tensors[gguf_to_hf_name(name, config)[0]], config) for name in expected}


def from_hf_values(name, values, config):
    """The values of GGUF tensor ``name`` from its Hugging Face tensor: q and k rows (and
    their biases and norms) to adjacent-pair order, Gemma's norm weights w to 1 + w."""
    values = np.asarray(values, np.float32)
    heads = gguf_to_hf_name(name, config)[1]
    if heads is not None:
        values = permute_rope_rows(values, heads)
    return values + np.float32(1) if _holds_one_plus_w(name, config) else values


def to_hf_values(name, values, config):
    """The inverse of :func:`from_hf_values`: a GGUF tensor's values as Hugging Face stores them."""
    values = np.asarray(values, np.float32)
    heads = gguf_to_hf_name(name, config)[1]
    if heads is not None:
        values = unpermute_rope_rows(values, heads)
    return values - np.float32(1) if _holds_one_plus_w(name, config) else values


def _holds_one_plus_w(name, config):
    """Whether GGUF tensor ``name`` is a norm that the model (and a GGUF) holds as 1 + w."""
    return config.norm_plus_one and name.endswith("norm.weight")


def gguf_to_hf_name(name, config):
    """A GGUF tensor name → (its Hugging Face name, the head count whose rows HF orders for
    rotate-half RoPE (q and k, their biases; 1 for the q/k norms, one head wide), else None):
    the one name map both directions read."""
    if name in GGUF_TO_HF_NAMES:
        return GGUF_TO_HF_NAMES[name], None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias"):
        layer, kind, part = f"model.layers.{int(parts[1])}.", parts[2], parts[3]
        norms = GGUF_TO_HF_POST_NORMS if config.post_norms else GGUF_TO_HF_NORMS
        if kind in norms and part == "weight":
            return f"{layer}{norms[kind]}.weight", 1 if kind in ("attn_q_norm", "attn_k_norm") else None
        if kind in HF_LINEAR_NAMES:
            return f"{layer}{HF_LINEAR_NAMES[kind]}.{part}", rope_heads(config, kind)
    raise CheckpointError(f"{name!r} is not a tensor of this model (no Hugging Face name for it)")


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
