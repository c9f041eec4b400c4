"""GGUF files for llama.cpp: a LoRA adapter, or the whole model with its adapters merged in.

Adapter (what llama.cpp's ``--lora`` reads): metadata ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32), and per adapted weight
``<name>.lora_a`` (r, in) and ``<name>.lora_b`` (out, r). llama.cpp computes
y = W x + alpha / r · B (A x), so alpha is stored as ``scale · r``: plain LoRA stores
its alpha, rsLoRA (scale alpha/√r) stores alpha·√r. B is stored in the GGUF row order
of q and k, which is the order the model already uses.

Merged model: W' = W + scale · B @ A for every adapted layer (W decoded first when it
is 4-bit), written as F32, F16, Q8_0 or Q4_0 with gguf-py's quantizers (IQ4_NL with
:mod:`qlora_np.io.gguf_quants`), with every
metadata key of the source GGUF (tokenizer included) copied over.
"""


import numpy as np

from qlora_np.errors import CheckpointError, InvalidValueError, ShapeError, UnknownFormatError
from qlora_np.io.gguf import decode_tensor, metadata_items, open_gguf, write_gguf
from qlora_np.io.gguf_quants import TensorError, quantize_iq4_nl
from qlora_np.io.merge import merged_weights
from qlora_np.models.llama.adapters import attach_adapter, model_adapters
from qlora_np.models.llama.architectures import check_llama_gguf
from qlora_np.models.llama.names import LINEAR_NAMES

ADAPTER_DTYPES = ("F32", "F16")
MERGED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "IQ4_NL")
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "IQ4_NL": 25}
"""``general.file_type``: llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, _Q4_0, _Q8_0, _IQ4_NL."""
QUANT_BLOCK = 32
"""Values per Q8_0 / Q4_0 block, along a row."""


# ---------------------------------------------------------------------------
# LoRA adapter
# ---------------------------------------------------------------------------

def save_gguf_adapter(model, path, dtype="F32"):
    """Write the model's adapters as a llama.cpp LoRA adapter GGUF; returns the alpha stored.

    llama.cpp has one alpha per file: layers whose scale·r differs from the first
    layer's get the ratio folded into their B, so every layer keeps its own scale.
    """
    import gguf

    if dtype not in ADAPTER_DTYPES:
        raise UnknownFormatError(f"adapter dtype must be one of {ADAPTER_DTYPES}, got {dtype!r}")
    check_llama_gguf(model.config, path)
    adapted = list(model_adapters(model))
    if not adapted:
        raise InvalidValueError("the model has no adapters to export (inject_lora or load_peft first)")
    alpha = float(np.float32(adapted[0][2].scale * adapted[0][2].r))
    storage = np.float32 if dtype == "F32" else np.float16
    tensors = []
    for index, name, layer in adapted:
        factor = layer.scale * layer.r / alpha                # 1 unless ranks or alphas differ
        base = f"blk.{index}.{name}.weight"
        tensors.append((base + ".lora_a", layer.lora_a.shape, gguf.GGMLQuantizationType[dtype],
                        lambda a=layer.lora_a: a.astype(storage)))
        tensors.append((base + ".lora_b", layer.lora_b.shape, gguf.GGMLQuantizationType[dtype],
                        lambda b=layer.lora_b, f=factor: (b * f).astype(storage)))
    metadata = [("general.type", "adapter", gguf.GGUFValueType.STRING, None),
                ("adapter.type", "lora", gguf.GGUFValueType.STRING, None),
                ("adapter.lora.alpha", alpha, gguf.GGUFValueType.FLOAT32, None)]
    write_gguf(path, "llama", metadata, tensors)
    return alpha


def load_gguf_adapter(model, path):
    """Attach the adapters of a llama.cpp LoRA adapter GGUF to ``model``; returns the alpha read.

    Anything but a well-formed llama LoRA adapter whose names and shapes fit the model
    raises CheckpointError.
    """
    check_llama_gguf(model.config, path)
    reader = open_gguf(path)
    alpha = _adapter_alpha(reader, path)
    pairs = {}
    for tensor in reader.tensors:
        base, _, half = tensor.name.rpartition(".")
        if half not in ("lora_a", "lora_b"):
            raise CheckpointError(f"{path}: tensor {tensor.name!r} is not a .lora_a / .lora_b half")
        pairs.setdefault(base, {})[half] = tensor
    for base, halves in pairs.items():
        index, name = _parse_layer_name(base, path)
        if set(halves) != {"lora_a", "lora_b"}:
            raise CheckpointError(f"{path}: {base} has only {sorted(halves)}")
        lora_a, lora_b = (_decoded(halves[half], path) for half in ("lora_a", "lora_b"))
        try:
            attach_adapter(model, index, name, lora_a, lora_b, alpha)
        except (ShapeError, InvalidValueError) as error:
            raise CheckpointError(f"{path}: {error}") from None
    return alpha


def _adapter_alpha(reader, path):
    """adapter.lora.alpha of a reader, after checking the adapter's identity keys."""
    import gguf

    def value(key):
        field = reader.fields.get(key)
        try:
            return None if field is None else field.contents()
        except (ValueError, IndexError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: metadata {key!r} is malformed") from None

    for key, expected in (("general.architecture", "llama"), ("general.type", "adapter"),
                          ("adapter.type", "lora")):
        if value(key) != expected:
            raise CheckpointError(f"{path}: {key} must be {expected!r}, got {value(key)!r}")
    field = reader.fields.get("adapter.lora.alpha")
    if field is None or field.types != [gguf.GGUFValueType.FLOAT32]:
        raise CheckpointError(f"{path}: adapter.lora.alpha must be a float32 (llama.cpp aborts otherwise)")
    alpha = float(value("adapter.lora.alpha"))
    if not np.isfinite(alpha):
        raise CheckpointError(f"{path}: adapter.lora.alpha is {alpha}")
    return alpha


def _parse_layer_name(base, path):
    """"blk.7.attn_q.weight" → (7, "attn_q"); other names raise CheckpointError."""
    parts = base.split(".")
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in LINEAR_NAMES \
            or parts[3] != "weight":
        names = "|".join(LINEAR_NAMES)
        raise CheckpointError(f"{path}: {base!r} is not a block linear weight (blk.N.<{names}>.weight)")
    return int(parts[1]), parts[2]


def _decoded(tensor, path):
    if tensor.tensor_type.name not in ADAPTER_DTYPES or len(tensor.shape) != 2:
        raise CheckpointError(f"{path}: {tensor.name} must be a 2-D F32/F16 tensor, "
                              f"got {tensor.tensor_type.name} with ne {tensor.shape.tolist()}")
    values = decode_tensor(tensor)
    if not np.all(np.isfinite(values)):
        raise CheckpointError(f"{path}: {tensor.name} holds NaN or inf")
    return values


# ---------------------------------------------------------------------------
# Merged model
# ---------------------------------------------------------------------------

def save_merged_gguf(model, source, path, tensor_type="F32"):
    """Write ``model`` with its adapters merged in as a full GGUF llama.cpp runs.

    ``source`` is the GGUF the model was loaded from (a path, or an open
    ``gguf.GGUFReader`` to skip parsing it again): every metadata key (tokenizer, chat
    template, sizes) is copied from it. 1-D tensors (the norms) stay F32; 2-D
    ones are stored as ``tensor_type``, except that a Q4_0 or IQ4_NL file keeps the token
    embedding (also the tied output layer) in Q8_0, as llama.cpp keeps that tensor
    above 4 bits, and rows that do not split into 32-value blocks fall back to F16.
    A tied LM head is the token embedding itself, so it is written in float even when
    the model multiplies with a 4-bit copy of it. Returns one :class:`TensorError` per tensor.
    """
    import gguf

    if tensor_type not in MERGED_TYPES:
        raise UnknownFormatError(f"tensor_type must be one of {MERGED_TYPES}, got {tensor_type!r}")
    check_llama_gguf(model.config, path)
    reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)
    metadata = list(metadata_items(reader, skip=("general.file_type",)))
    metadata.append(("general.file_type", FILE_TYPES[tensor_type], gguf.GGUFValueType.UINT32, None))
    report = []

    def stored(name, make_exact, ggml_type):
        def make():
            exact = make_exact()                                              # float32, NumPy shape
            if ggml_type == gguf.GGMLQuantizationType.IQ4_NL:              # gguf-py only decodes it
                data = quantize_iq4_nl(exact)
            else:
                data = gguf.quants.quantize(exact, ggml_type)
            decoded = gguf.quants.dequantize(data, ggml_type).reshape(exact.shape)
            error = decoded.astype(np.float64) - exact
            norm = max(float(np.linalg.norm(exact)), 1e-30)
            report.append(TensorError(name, ggml_type.name, float(np.abs(error).max()),
                                      float(np.linalg.norm(error)) / norm))
            return data
        return make

    tensors = []
    for name, shape, make_exact in merged_weights(model):
        target = gguf.GGMLQuantizationType[_stored_type(name, shape, tensor_type)]
        tensors.append((name, shape, target, stored(name, make_exact, target)))
    if model.config.rope_freq_factors:                        # Llama 3.x's RoPE scaling, as llama.cpp reads it
        factors = np.asarray(model.config.rope_freq_factors, np.float32)                    # (hd/2,)
        tensors.append(("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32, lambda: factors))
    write_gguf(path, "llama", metadata, tensors)
    return report


def _stored_type(name, shape, tensor_type):
    """The GGUF type one tensor of a ``tensor_type`` file gets (see :func:`save_merged_gguf`)."""
    if len(shape) == 1:
        return "F32"
    if tensor_type in ("Q4_0", "IQ4_NL") and name == "token_embd.weight":
        tensor_type = "Q8_0"
    if tensor_type in ("Q8_0", "Q4_0", "IQ4_NL") and shape[-1] % QUANT_BLOCK:
        return "F16"
    return tensor_type


def format_error_report(report):
    """The per-tensor errors as a table, worst relative error first."""
    lines = [f"{'tensor':<28}{'type':>6}{'max |err|':>12}{'rel. error':>12}"]
    for row in sorted(report, key=lambda r: -r.relative_error):
        lines.append(f"{row.name:<28}{row.tensor_type:>6}{row.max_abs_error:>12.3e}"
                     f"{row.relative_error:>12.3e}")
    return "\n".join(lines)
