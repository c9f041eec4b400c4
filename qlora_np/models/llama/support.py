"""What this Llama implementation computes, and the typed refusal of everything else.

A checkpoint of a related architecture (Qwen2's q/k/v biases, Gemma's (1 + w) RMSNorm,
Llama 3's rope scaling, …) has the same tensor names as a Llama one and would load and run,
wrong, without an error. So every loader asks here first: the Hugging Face ``config.json``
(:func:`check_hf_config`), the GGUF metadata (:func:`check_gguf_metadata`) and the tensors
a checkpoint holds against the ones the model reads (:func:`check_tensors`). Anything not
implemented raises :class:`~qlora_np.errors.UnsupportedModelError` naming the architecture
and the key or tensor; nothing is half-loaded.
"""

from qlora_np.errors import CheckpointError, UnsupportedModelError
from qlora_np.models.llama.architectures import HF_CLASSES, rope_parameter_sets

HF_ARCHITECTURES = {cls: model_type for model_type, cls in HF_CLASSES.items()}
"""The Hugging Face classes this model computes (see :mod:`~qlora_np.models.llama.architectures`),
class → model_type."""

_NO_SCALING = (None, "default")
"""``rope_scaling`` / ``rope_parameters`` types that leave RoPE as it is."""


def check_hf_config(hf, path):
    """The model_type of ``hf`` (a parsed config.json); UnsupportedModelError unless it is one
    of :data:`HF_ARCHITECTURES`' and uses no RoPE variant or key this forward does not compute
    (the per-architecture switches themselves are read, and checked, by
    :func:`~qlora_np.models.llama.architectures.hf_architecture`)."""
    model_type = hf.get("model_type")
    if model_type is None:                           # older configs name only the class
        classes = hf.get("architectures")
        first = classes[0] if isinstance(classes, list) and classes else None
        model_type = HF_ARCHITECTURES.get(first, first)
    if model_type not in HF_CLASSES:
        raise UnsupportedModelError(f"{path}: model_type {model_type!r} is not supported "
                                    f"(supported: {', '.join(sorted(HF_CLASSES))})")

    def refuse(what):
        raise UnsupportedModelError(f"{path}: {model_type} with {what} is not supported")

    for key, rope in rope_parameter_sets(hf):
        if not isinstance(rope, dict):
            refuse(f"{key} {rope!r}")
        kind = rope_type(rope)
        if kind not in _NO_SCALING and not (kind == "llama3" and model_type == "llama" and "[" not in key):
            refuse(f"{key} type {kind!r}")
    for key in ("qkv_bias", "use_qk_norm"):
        if hf.get(key):
            refuse(f"{key}=true")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(f"partial_rotary_factor {hf['partial_rotary_factor']!r}")
    return model_type


def rope_type(rope):
    """The type of a ``rope_scaling`` / ``rope_parameters`` dict (None for none): transformers
    names it ``rope_type``, older configs ``type``."""
    rope = rope or {}
    return rope.get("rope_type", rope.get("type"))


def check_gguf_metadata(value, path):
    """Raise UnsupportedModelError unless the GGUF metadata (``value(key, default)`` reads a key)
    describes a plain Llama: architecture "llama", no rope scaling, no experts, RoPE over whole
    heads, keys and values of the head size."""
    arch = value("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama)")

    def refuse(what):
        raise UnsupportedModelError(f"{path}: llama GGUF with {what} is not supported")

    scaling = value("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        refuse(f"llama.rope.scaling.type {scaling!r}")
    factor = value("llama.rope.scaling.factor")
    if factor not in (None, 0.0, 1.0):
        refuse(f"llama.rope.scaling.factor {factor!r}")
    experts = value("llama.expert_count")
    if experts not in (None, 0):
        refuse(f"{experts} experts (llama.expert_count)")
    heads, hidden = value("llama.attention.head_count"), value("llama.embedding_length")
    if isinstance(heads, int) and isinstance(hidden, int) and heads:
        head_dim = hidden // heads
        for key in ("llama.rope.dimension_count", "llama.attention.key_length",
                    "llama.attention.value_length"):
            size = value(key)
            if size is not None and size != head_dim:
                refuse(f"{key} {size} other than the head size {head_dim}")
    window = value("llama.attention.sliding_window")
    if window not in (None, 0):
        refuse(f"llama.attention.sliding_window {window}")


def check_tensors(names, expected, path):
    """Raise UnsupportedModelError if the checkpoint holds tensors the model would not read
    (``names`` beyond ``expected``): a bias, a q/k norm, Llama 3's ``rope_freqs.weight``, …
    Each of them changes what the model computes, so leaving one out would be wrong silently."""
    unread = sorted(set(names) - set(expected))
    if unread:
        shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        raise UnsupportedModelError(f"{path}: tensors this Llama implementation does not compute "
                                    f"with: {shown}")


def check_shapes(shapes, expected, path):
    """Raise CheckpointError unless every tensor of ``expected`` (name → shape) is in ``shapes``
    (name → shape) with that shape: a file whose tensors disagree with its own metadata."""
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{path}: checkpoint has no tensor {name!r}")
        if tuple(shapes[name]) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(shapes[name])}, "
                                  f"the model's metadata needs {tuple(shape)}")
