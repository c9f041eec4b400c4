"""Reading GGUF files through gguf-py: metadata values and tensors decoded to float32."""

import numpy as np


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

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(values, np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
