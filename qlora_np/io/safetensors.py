"""Read and write .safetensors files with NumPy: a JSON header, then raw little-endian tensors.

Written here (instead of using the ``safetensors`` package) so that bfloat16 tensors
load as ``ml_dtypes.bfloat16`` and nothing but NumPy is needed. The reader checks every
offset against the file size and never executes anything it reads; the writer replaces
the target atomically (a crash leaves the old file or the new one, never half of one).
"""

import contextlib
import json
import os
import tempfile

import ml_dtypes
import numpy as np

from qlora_np.errors import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
          "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
DTYPE_NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
CHECKPOINT_FILE = "model.safetensors"
CHECKPOINT_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2 ** 20
HEADER_ALIGNMENT = 8


def read_safetensors(path):
    """name → ndarray for every tensor of a .safetensors file (memory-mapped, read-only)."""
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path}: too short for a safetensors header")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: header of {header_size} bytes does not fit the file")
        try:
            header = json.loads(stream.read(header_size).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object")
    data = np.memmap(path, np.uint8, mode="r", offset=8 + header_size) if size > 8 + header_size \
        else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor(path, name, info, data)
    return tensors


def _tensor(path, name, info, data):
    try:
        dtype = np.dtype(DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        start, stop = (int(v) for v in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
    count = int(np.prod(shape, dtype=object)) if shape else 1
    fits = 0 <= start <= stop <= data.size and stop - start == count * dtype.itemsize
    if any(d < 0 for d in shape) or not fits:
        raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']} {shape}) does not match "
                              f"its byte range {start}…{stop} of {data.size}")
    return data[start:stop].view(dtype).reshape(shape)


def save_safetensors(path, tensors, metadata=None):
    """Write name → ndarray (and optional str → str ``metadata``) to ``path`` atomically.

    Tensors are stored little-endian, C order, in name order; the header is padded with
    spaces to a multiple of 8 bytes as the format recommends.
    """
    header, arrays, offset = {}, [], 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise CheckpointError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if array.dtype.newbyteorder("<") not in DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
        array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    with atomic_write(path) as stream:
        stream.write(len(encoded).to_bytes(8, "little"))
        stream.write(encoded)
        for array in arrays:
            stream.write(array.tobytes())


@contextlib.contextmanager
def atomic_path(path):
    """A temporary file name beside ``path`` to write to; on success the file is fsynced and
    renamed over ``path``, on failure removed (a crash leaves the old file or the new one)."""
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(descriptor)
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """:func:`atomic_path` as an open file (text modes write UTF-8)."""
    with atomic_path(path) as temporary:
        with open(temporary, mode, encoding=None if "b" in mode else "utf-8") as stream:
            yield stream


def read_json(path):
    """The JSON value in ``path``; an unreadable or malformed file raises CheckpointError."""
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def read_checkpoint_tensors(folder):
    """name → array of every tensor of ``model.safetensors`` or of its index's shards (memory maps)."""
    index_path = os.path.join(folder, CHECKPOINT_INDEX)
    if os.path.isfile(index_path):
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_path}: needs a weight_map of tensor name → file name")
        files = sorted(set(weight_map.values()))
        if any(os.path.basename(f) != f for f in files):
            raise CheckpointError(f"{index_path}: shard names must be plain file names, got {files}")
    else:
        files = [CHECKPOINT_FILE]
    tensors = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: no {name}")
        tensors.update(read_safetensors(path))
    return tensors
