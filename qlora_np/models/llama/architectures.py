"""The Hugging Face architectures this one model computes, each as data: which of
:class:`~qlora_np.models.llama.config.LlamaConfig`'s switches its config.json turns on.

One forward pass serves them all. What differs between Llama, Mistral, Qwen2/3, Gemma 1/2/3,
SmolLM3 and Granite is a handful of choices, read here from config.json (and written back by
:func:`hf_architecture_keys`):

=================  =====================================================================
switch             who uses it
=================  =====================================================================
biases             Qwen2/2.5 (q, k, v); Llama/Granite ``attention_bias`` (q, k, v, o) and
                   ``mlp_bias`` (gate, up, down); Qwen3/Gemma ``attention_bias``
qk_norm            Qwen3, Gemma 3: an RMSNorm over each head of q and of k before RoPE
head_size          Qwen3, Gemma: heads wider than hidden / heads
layer_windows      Mistral (every layer), Qwen2/3 and SmolLM3 (the layers config.json
                   names), Gemma 2/3 (alternating or 5-in-6 sliding layers)
layer_thetas       SmolLM3's layers without RoPE (0), Gemma 3's local RoPE base
norm_plus_one      Gemma: norms scale by (1 + w); the model holds 1 + w, as GGUF files do
embedding_scale    Gemma √hidden, Granite ``embedding_multiplier``
activation         Gemma's GeGLU with tanh-approximate GELU instead of SwiGLU
post_norms         Gemma 2/3: a norm after attention and after the MLP, before each residual add
attention_scale    Gemma ``query_pre_attn_scalar``^-1/2, Granite ``attention_multiplier``
softcaps           Gemma 2: ``cap · tanh(x / cap)`` on the attention scores and the logits
residual_scale     Granite ``residual_multiplier``
logit_scale        Granite 1 / ``logits_scaling``
=================  =====================================================================
"""

import math

from qlora_np.errors import UnsupportedModelError

ATTENTION_BIASES = ("attn_q", "attn_k", "attn_v", "attn_output")
MLP_BIASES = ("ffn_gate", "ffn_up", "ffn_down")

HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "gemma3_text": "Gemma3ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
              "granite": "GraniteForCausalLM"}
"""model_type → the transformers class of each supported architecture."""

GEMMAS = ("gemma", "gemma2", "gemma3_text")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")
"""transformers' names of the tanh approximation of GELU."""


def hf_architecture(hf, model_type, num_layers, path):
    """The LlamaConfig fields (a dict) that config.json ``hf`` of ``model_type`` sets beyond the
    sizes. Values this model does not compute raise UnsupportedModelError."""
    def refuse(what):
        raise UnsupportedModelError(f"{path}: {model_type} with {what} is not supported")

    fields = {"model_type": model_type}
    # 1. biases
    biases = ()
    if model_type == "qwen2":                                      # always, and only q, k, v
        biases = ATTENTION_BIASES[:3]
    elif hf.get("attention_bias") and model_type != "mistral":     # Mistral's classes take none
        biases = ATTENTION_BIASES
    if hf.get("mlp_bias") and model_type in ("llama", "granite", "smollm3"):
        biases += MLP_BIASES
    fields["biases"] = biases
    # 2. the head size, when config.json gives it apart from hidden / heads
    head_dim, hidden, heads = hf.get("head_dim"), hf.get("hidden_size"), hf.get("num_attention_heads")
    if isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim != hidden // heads:
        fields["head_size"] = head_dim
    fields["qk_norm"] = model_type in ("qwen3", "gemma3_text")
    # 3. the activation of the gated MLP
    if model_type == "gemma":                                   # and transformers reads its "gelu" as tanh
        activation = hf.get("hidden_act") or "gelu_pytorch_tanh"
        activation = "gelu_pytorch_tanh" if activation == "gelu" else activation
    elif model_type in GEMMAS:
        activation = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
        activation = hf.get("hidden_act", "silu")
    if activation in GELU_TANH and model_type in GEMMAS:
        fields["activation"] = "gelu_tanh"
    elif activation != "silu":
        refuse(f"hidden_act {activation!r}")
    # 4. sliding windows and per-layer RoPE
    fields["layer_windows"] = _layer_windows(hf, model_type, num_layers, refuse)
    fields["layer_thetas"] = _layer_thetas(hf, model_type, fields["layer_windows"], num_layers, refuse)
    # 5. Gemma's norms, embedding scale, soft-caps and attention scale
    hidden = hf.get("hidden_size")
    if model_type in GEMMAS:
        fields.update(norm_plus_one=True, embedding_scale=float(hidden) ** 0.5,
                      post_norms=model_type != "gemma")
        if model_type != "gemma":
            fields["attention_scale"] = _number(hf.get("query_pre_attn_scalar", 256), "query_pre_attn_scalar",
                                                refuse) ** -0.5
        caps = (("attn_logit_softcapping", "attention_softcap"), ("final_logit_softcapping", "final_softcap"))
        if model_type == "gemma3_text":             # its attention never applies the first
            caps = caps[1:]
        for key, field in caps:
            cap = hf.get(key, {"gemma2": {"attn_logit_softcapping": 50.0,
                                          "final_logit_softcapping": 30.0}}.get(model_type, {}).get(key))
            if cap is not None:
                fields[field] = _number(cap, key, refuse)
        if hf.get("use_bidirectional_attention"):
            refuse("use_bidirectional_attention=true")
    # 6. Granite's multipliers
    if model_type == "granite":
        for key, field in (("embedding_multiplier", "embedding_scale"),
                           ("residual_multiplier", "residual_scale"),
                           ("attention_multiplier", "attention_scale")):
            if key in hf:
                fields[field] = _number(hf[key], key, refuse)
        if "logits_scaling" in hf:
            fields["logit_scale"] = 1.0 / _number(hf["logits_scaling"], "logits_scaling", refuse)
    return fields


def _number(value, key, refuse):
    """A positive finite number from config.json."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        refuse(f"{key} {value!r} (a positive number is needed)")
    return float(value)


def _layer_windows(hf, model_type, num_layers, refuse):
    """Each layer's sliding window (0: it sees every earlier position) as transformers
    decides: Mistral's window is every layer's; the others name their sliding layers in
    ``layer_types``, or derive them as their config classes do."""
    window = hf.get("sliding_window")
    if model_type == "mistral":
        window = hf.get("sliding_window", 4096)
        return (_window(window, refuse),) * num_layers if window is not None else ()
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        return ()
    if model_type == "smollm3" and not (hf.get("use_sliding_window") and window is not None):
        return ()
    if model_type not in ("qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text"):
        if hf.get("use_sliding_window") or (window is not None and model_type != "gemma"):
            refuse(f"sliding_window {window!r}")
        return ()
    types = hf.get("layer_types")
    if types is None:
        types = [_default_layer_type(hf, model_type, layer) for layer in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or \
            not set(types) <= {"sliding_attention", "full_attention"}:
        refuse(f"layer_types {types!r}")
    if "sliding_attention" in types and window is None:
        window = 4096 if model_type in ("gemma2", "gemma3_text") else None
    windows = tuple(_window(window, refuse) if kind == "sliding_attention" else 0 for kind in types)
    return windows if any(windows) else ()


def _default_layer_type(hf, model_type, layer):
    """A layer's attention as each config class derives it when config.json lists none."""
    if model_type == "gemma2":
        sliding = layer % 2 == 0
    elif model_type == "gemma3_text":
        sliding = (layer + 1) % hf.get("sliding_window_pattern", 6) != 0
    elif model_type == "smollm3":
        sliding = not _no_rope_layers(hf, layer + 1)[layer]
    else:                                                           # Qwen2/3: from max_window_layers on
        sliding = layer >= hf.get("max_window_layers", 28)
    return "sliding_attention" if sliding else "full_attention"


def _window(window, refuse):
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        refuse(f"sliding_window {window!r}")
    return window


def _no_rope_layers(hf, num_layers):
    """SmolLM3's per-layer RoPE flags (1: RoPE, 0: none), by default every 4th layer without."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval", 4)
        flags = [int((layer + 1) % interval != 0) for layer in range(num_layers)]
    return flags


def _layer_thetas(hf, model_type, windows, num_layers, refuse):
    """Each layer's RoPE base, 0 for a layer without RoPE; () when every layer has rope_theta."""
    if model_type == "smollm3":
        flags = _no_rope_layers(hf, num_layers)
        if not isinstance(flags, list) or len(flags) != num_layers or not set(flags) <= {0, 1}:
            refuse(f"no_rope_layers {flags!r}")
        if all(flags):
            return ()
        return tuple(global_theta(hf, model_type) if flag else 0.0 for flag in flags)
    if model_type == "gemma3_text":
        local = local_theta(hf)
        if local is None or not windows:
            return ()
        return tuple(local if window else global_theta(hf, model_type) for window in windows)
    return ()


DEFAULT_THETAS = {"gemma3_text": 1e6, "smollm3": 2e6}
"""transformers' RoPE base for a config.json that names none (10,000 for the others)."""


def global_theta(hf, model_type):
    """config.json's RoPE base: ``rope_theta`` at the top, or in ``rope_parameters`` (flat, or
    per layer type as Gemma 3's are)."""
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    rope = rope if isinstance(rope, dict) else {}
    return float(hf.get("rope_theta", rope.get("rope_theta", DEFAULT_THETAS.get(model_type, 10000.0))))


def local_theta(hf):
    """Gemma 3's RoPE base of its sliding layers, or None."""
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("sliding_attention"), dict):
        return float(rope["sliding_attention"].get("rope_theta", 10000.0))
    value = hf.get("rope_local_base_freq", 10000.0)
    return float(value)


def rope_parameter_sets(hf):
    """Every RoPE parameter dict in config.json (``rope_scaling``, ``rope_parameters`` flat or
    per layer type), as (key, dict or the odd value found)."""
    found = []
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key)
        if isinstance(rope, dict) and rope and all(isinstance(value, dict) for value in rope.values()) \
                and set(rope) <= {"full_attention", "sliding_attention"}:
            found += [(f"{key}[{kind}]", value) for kind, value in rope.items()]
        elif rope is not None:
            found.append((key, rope))
    return found


def hf_architecture_keys(config):
    """The config.json keys that give transformers this architecture back (the inverse of
    :func:`hf_architecture`); raises UnsupportedModelError for a combination it cannot name."""
    model_type = config.model_type
    keys = {"architectures": [HF_CLASSES[model_type]], "model_type": model_type}
    biases = set(config.biases)
    if model_type == "qwen2":
        if biases != set(ATTENTION_BIASES[:3]):
            raise UnsupportedModelError(f"a qwen2 config.json holds q/k/v biases only, not {sorted(biases)}")
    else:
        keys["attention_bias"] = bool(biases & set(ATTENTION_BIASES))
        if model_type in ("llama", "granite", "smollm3"):
            keys["mlp_bias"] = bool(biases & set(MLP_BIASES))
    if model_type in GEMMAS:
        keys["hidden_activation" if model_type != "gemma" else "hidden_act"] = "gelu_pytorch_tanh"
        if model_type != "gemma":
            scalar = round(config.attention_scale ** -2, 6)
            keys["query_pre_attn_scalar"] = int(scalar) if scalar.is_integer() else scalar
            keys["attn_logit_softcapping"] = config.attention_softcap or None
            keys["final_logit_softcapping"] = config.final_softcap or None
    else:
        keys["hidden_act"] = "silu"
    windows = config.layer_windows
    if windows:
        keys["sliding_window"] = max(windows)
        if model_type != "mistral":
            keys["layer_types"] = ["sliding_attention" if window else "full_attention" for window in windows]
            keys["use_sliding_window"] = True
            keys["max_window_layers"] = 0
    elif model_type == "mistral" or model_type in GEMMAS[1:]:
        keys["sliding_window"] = None
    if model_type == "smollm3":
        keys["no_rope_layers"] = [int(theta != 0) for theta in config.layer_thetas] or [1] * config.num_layers
    if model_type == "gemma3_text":
        local = [theta for theta, window in zip(config.layer_thetas, windows) if window]
        keys["rope_local_base_freq"] = local[0] if local else config.rope_theta
        keys["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": keys["rope_local_base_freq"]}}
    if model_type == "granite":
        keys.update(embedding_multiplier=config.embedding_scale, residual_multiplier=config.residual_scale,
                    attention_multiplier=config.attention_scale or config.head_dim ** -0.5,
                    logits_scaling=1.0 / config.logit_scale)
    return keys


def check_llama_gguf(config, what):
    """Raise UnsupportedModelError unless a llama-architecture GGUF holds ``config`` exactly:
    a Llama (or a Mistral without a window) with none of the switches above. ``what``
    names the file being written or read, for the message."""
    from dataclasses import fields

    plain = type(config)(**{f.name: getattr(config, f.name) for f in fields(config)
                            if f.name in _SIZES})
    differs = [f.name for f in fields(config) if f.name not in _SIZES
               and getattr(config, f.name) != getattr(plain, f.name) and f.name != "model_type"]
    if config.model_type not in ("llama", "mistral") or differs:
        raise UnsupportedModelError(f"{what}: llama.cpp's llama architecture, which these GGUF files "
                                    f"use, cannot hold a {config.model_type} model"
                                    + (f" with {', '.join(differs)}" if differs else ""))


_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
          "rope_theta", "rms_norm_eps", "context_length", "rope_freq_factors", "rope_scaling")
"""The LlamaConfig fields a llama GGUF's metadata (and rope_freqs.weight) carries."""
