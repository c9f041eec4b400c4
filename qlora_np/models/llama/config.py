"""The shape of a Llama-architecture model (:class:`LlamaConfig`) and one block's weights."""

import math
import os
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from qlora_np.errors import CheckpointError
from qlora_np.io.gguf import field_value
from qlora_np.io.safetensors import read_json
from qlora_np.models.llama.architectures import global_theta, hf_architecture, rope_parameter_sets
from qlora_np.models.llama.support import check_gguf_metadata, check_hf_config, rope_type

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
"""The parameters of Llama 3.x's RoPE scaling (``rope_type`` "llama3")."""


@dataclass(frozen=True)
class LlamaConfig:
    """The sizes and constants of a Llama-architecture model."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    context_length: int = 2048
    rope_freq_factors: tuple = ()
    """What each RoPE frequency theta^(-2i/head_dim) is divided by, (head_dim/2,) floats, as
    llama.cpp's ``rope_freqs.weight`` holds them; () for plain RoPE."""
    rope_scaling: tuple = ()
    """Llama 3.x's RoPE scaling parameters as (name, value) pairs in :data:`LLAMA3_KEYS` order
    (what a Hugging Face config.json gets written with); () when there are none."""
    # What sets the related architectures apart (see qlora_np.models.llama.architectures);
    # the defaults are a plain Llama's.
    model_type: str = "llama"
    """The Hugging Face model_type these switches came from (and are written back as)."""
    head_size: int = 0
    """The width of a head when config.json gives it apart; 0: hidden_size / num_heads."""
    biases: tuple = ()
    """The linear layers (LINEAR_NAMES) that add a bias."""
    qk_norm: bool = False
    """An RMSNorm over each head of q and of k before RoPE (``attn_q_norm`` / ``attn_k_norm``)."""
    layer_windows: tuple = ()
    """Each layer's sliding window: a query sees the keys less than that many positions back
    (itself included); 0, or () for every layer, sees all earlier positions."""
    layer_thetas: tuple = ()
    """Each layer's RoPE base, 0.0 for a layer without RoPE; () for rope_theta in every layer."""
    norm_plus_one: bool = False
    """The checkpoint's norm weights w scale by (1 + w) (Gemma): the model holds 1 + w."""
    embedding_scale: float = 1.0
    """What the token embeddings are multiplied by on the way in."""
    activation: str = "silu"
    """The gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh-approximate GELU)."""
    post_norms: bool = False
    """A norm on the output of attention and of the MLP before each residual add
    (``attn_post_norm`` / ``ffn_post_norm``)."""
    attention_scale: float = 0.0
    """What q·k is multiplied by; 0.0: 1/√head_dim."""
    attention_softcap: float = 0.0
    """Attention scores become cap · tanh(score / cap) (after scaling); 0.0: none."""
    final_softcap: float = 0.0
    """Logits become cap · tanh(logit / cap); 0.0: none."""
    residual_scale: float = 1.0
    """What each block's attention and MLP outputs are multiplied by before the residual add."""
    logit_scale: float = 1.0
    """What the logits are multiplied by."""

    @property
    def head_dim(self):
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def scale(self):
        """What attention multiplies q·k by."""
        return self.attention_scale or 1 / math.sqrt(self.head_dim)

    def window(self, layer):
        """Layer ``layer``'s sliding window (0: none)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    def theta(self, layer):
        """Layer ``layer``'s RoPE base (0.0: no RoPE in that layer)."""
        return self.layer_thetas[layer] if self.layer_thetas else self.rope_theta

    @classmethod
    def from_gguf(cls, reader, path=""):
        """From a GGUF's llama.* metadata; anything but a plain Llama raises UnsupportedModelError."""
        value = partial(field_value, reader)
        check_gguf_metadata(value, path or "GGUF file")
        tokens = value("tokenizer.ggml.tokens")
        return cls(vocab_size=int(value("llama.vocab_size", len(tokens) if tokens else 0)),
                   hidden_size=int(value("llama.embedding_length")),
                   num_layers=int(value("llama.block_count")),
                   num_heads=int(value("llama.attention.head_count")),
                   num_kv_heads=int(value("llama.attention.head_count_kv",
                                          value("llama.attention.head_count"))),
                   intermediate_size=int(value("llama.feed_forward_length")),
                   rope_theta=float(value("llama.rope.freq_base", 10000.0)),
                   rms_norm_eps=float(value("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                   context_length=int(value("llama.context_length", 2048)))

    @classmethod
    def from_hf_folder(cls, folder):
        """From a Hugging Face ``config.json`` (rope_theta at the top level or in rope_parameters);
        a config this forward does not compute exactly raises UnsupportedModelError."""
        path = os.path.join(folder, "config.json")
        hf = read_json(path)
        if not isinstance(hf, dict):
            raise CheckpointError(f"{path}: must hold a JSON object")
        model_type = check_hf_config(hf, path)
        try:
            config = cls(vocab_size=_size(hf["vocab_size"]), hidden_size=_size(hf["hidden_size"]),
                         num_layers=_size(hf["num_hidden_layers"]),
                         num_heads=_size(hf["num_attention_heads"]),
                         num_kv_heads=_size(hf.get("num_key_value_heads", hf["num_attention_heads"])),
                         intermediate_size=_size(hf["intermediate_size"]),
                         rope_theta=global_theta(hf, model_type),
                         rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),     # transformers' default
                         context_length=_size(hf.get("max_position_embeddings", 2048)))
            config = replace(config, **hf_architecture(hf, model_type, config.num_layers, path))
            if config.head_size:
                _size(config.head_size)
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise CheckpointError(f"{path}: missing or malformed Llama sizes: {error!r}") from None
        if config.num_heads % config.num_kv_heads or config.head_dim % 2 or \
                (not config.head_size and config.hidden_size % config.num_heads):
            raise CheckpointError(f"{path}: {config.num_heads} heads and {config.num_kv_heads} kv heads "
                                  f"do not split hidden size {config.hidden_size} into even head sizes")
        for _, scaling in rope_parameter_sets(hf):             # transformers 4 / 5 name it so
            if rope_type(scaling) == "llama3":
                return config.with_llama3_scaling(scaling, path)
        return config

    def with_llama3_scaling(self, rope, path=""):
        """This config with Llama 3.x's RoPE scaling (``rope``: a dict with :data:`LLAMA3_KEYS`)."""
        try:
            scaling = tuple((key, float(rope[key])) for key in LLAMA3_KEYS)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: llama3 rope scaling needs numbers for {', '.join(LLAMA3_KEYS)}: "
                                  f"{error!r}") from None
        factor, low, high, original = (value for _, value in scaling)
        if not (factor > 0 and 0 < low < high and original > 0 and original.is_integer()):
            raise CheckpointError(f"{path}: llama3 rope scaling needs factor > 0, 0 < low_freq_factor < "
                                  f"high_freq_factor and a whole original_max_position_embeddings, "
                                  f"got {dict(scaling)}")
        scaling = scaling[:3] + (("original_max_position_embeddings", int(original)),)
        factors = llama3_frequency_factors(self.head_dim, self.rope_theta, factor, low, high, original)
        return replace(self, rope_scaling=scaling, rope_freq_factors=factors)


def llama3_frequency_factors(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_context):
    """What Llama 3.x's RoPE scaling divides each frequency by, (head_dim/2,) as a tuple.

    1. Frequencies whose wavelength 2π/f is shorter than original_context / high_freq_factor
       stay as they are (factor 1).
    2. Those longer than original_context / low_freq_factor are divided by ``factor``.
    3. In between, 1/f moves smoothly from one to the other: f · ((1 − s)/factor + s) with
       s = (original_context / wavelength − low_freq_factor) / (high_freq_factor − low_freq_factor).
    """
    frequencies = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)   # (hd/2,)
    factors = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < original_context / high_freq_factor:
            factors.append(1.0)
        elif wavelength > original_context / low_freq_factor:
            factors.append(float(factor))
        else:
            smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


def _size(value):
    """A model size from JSON: a positive int (not a bool, not absurdly large)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2 ** 31:
        raise ValueError(f"sizes must be positive ints, got {value!r}")
    return value


class LlamaBlock:
    """One decoder block: attention and a gated MLP, each behind an RMSNorm; the norms some
    architectures add (after attention and the MLP, over each head of q and k) are None
    when the config has none."""

    def __init__(self, attn_norm, ffn_norm, linears, attn_post_norm=None, ffn_post_norm=None,
                 attn_q_norm=None, attn_k_norm=None):
        self.attn_norm = attn_norm                  # (hidden,)
        self.ffn_norm = ffn_norm                    # (hidden,)
        self.linears = linears                      # name → LoRALinear, names from LINEAR_NAMES
        self.attn_post_norm = attn_post_norm        # (hidden,) with post_norms
        self.ffn_post_norm = ffn_post_norm          # (hidden,) with post_norms
        self.attn_q_norm = attn_q_norm              # (head_dim,) with qk_norm
        self.attn_k_norm = attn_k_norm              # (head_dim,) with qk_norm

    def norms(self):
        """GGUF name (``attn_norm`` …) → weight, of every norm the block has."""
        return {name: weight for name in NORM_NAMES if (weight := getattr(self, name)) is not None}


NORM_NAMES = ("attn_norm", "attn_q_norm", "attn_k_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm")
"""A block's norms by their GGUF names, in the order the forward uses them."""
