"""GGUF files through gguf-py: metadata values, tensors decoded to float32, atomic writes."""

import numpy as np

from qlora_np.errors import CheckpointError, ShapeError
from qlora_np.io.safetensors import atomic_path


def open_gguf(path):
    """A ``gguf.GGUFReader`` of ``path``; a file gguf-py cannot parse raises CheckpointError."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable GGUF file: {error}") from None


def field_value(reader, key, default=None):
    """The value of metadata ``key`` of a ``gguf.GGUFReader``, or ``default`` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def decode_tensor(tensor):
    """A GGUF tensor (any type gguf-py decodes) as a float32 array in NumPy order.

    GGUF lists dimensions fastest first, so a linear weight with ne = [in, out] comes
    back as (out, in): the layout ``x @ W.T`` uses.
    """
    import gguf

    values = np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    if np.may_share_memory(values, tensor.data):     # F32 tensors come back as views of the mapped file:
        values = values.copy()                       # copied, so the mapping can go once loading is done
    return values.reshape(tuple(reversed(tensor.shape.tolist())))


def metadata_items(reader, skip=()):
    """(key, value, type, array item type) for every metadata field of a reader, ready for :func:`write_gguf`.

    Leaves out the GGUF.* header fields and general.architecture (the writer adds those)
    and the keys in ``skip``.
    """
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        sub_type = field.types[1] if len(field.types) > 1 else None
        yield key, field.contents(), field.types[0], sub_type


def write_gguf(path, architecture, metadata, tensors):
    """Write a GGUF file atomically, holding one tensor in memory at a time.

    ``metadata``: (key, value, GGUFValueType, array item type or None) tuples.
    ``tensors``: (name, NumPy shape, GGMLQuantizationType, make) tuples; ``make()``
    returns the stored data — float32/float16 values of that shape, or the uint8 blocks
    of a quantized type. All shapes are declared before the first ``make()`` runs.
    """
    import gguf

    with atomic_path(path) as temporary:
        writer = gguf.GGUFWriter(temporary, architecture)
        for key, value, value_type, sub_type in metadata:
            writer.add_key_value(key, value, value_type, sub_type=sub_type)
        for name, shape, tensor_type, _ in tensors:
            block, type_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
            if shape[-1] % block:
                raise ShapeError(f"{name}: rows of {shape[-1]} values do not split into "
                                 f"{tensor_type.name} blocks of {block}")
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_bytes
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, _, make in tensors:
            writer.write_tensor_data(np.ascontiguousarray(make()))
        writer.close()
