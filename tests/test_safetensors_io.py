"""The safetensors reader: same arrays as the safetensors package, typed errors on anything malformed."""

import ml_dtypes
import numpy as np
from hypothesis import given, settings, strategies as st
from safetensors.numpy import save, save_file

from qlora_np.io.safetensors import CheckpointError, read_safetensors


def test_reads_what_the_safetensors_package_writes(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16),
              "c": np.array([[1, -2]], np.int64), "empty": np.zeros((0, 3), np.float32)}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    loaded = read_safetensors(tmp_path / "x.safetensors")
    assert sorted(loaded) == sorted(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_bfloat16_loads_as_ml_dtypes(tmp_path):
    bits = np.array([0x3F80, 0xC000], np.uint16)                      # 1.0, -2.0 in bf16
    blob = save({"w": bits})
    header_size = int.from_bytes(blob[:8], "little")
    header = blob[8:8 + header_size].replace(b'"U16"', b'"BF16"')
    assert header.endswith(b" ")                                     # keep the length: drop one pad
    header = header[:-1]
    (tmp_path / "bf.safetensors").write_bytes(blob[:8] + header + blob[8 + header_size:])
    loaded = read_safetensors(tmp_path / "bf.safetensors")["w"]
    assert loaded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded.astype(np.float32), [1.0, -2.0])


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 400), position=st.integers(0, 400), byte=st.integers(0, 255),
       garbage=st.binary(max_size=40))
def test_corrupt_files_raise_checkpoint_error_or_load(tmp_path_factory, cut, position, byte, garbage):
    blob = bytearray(save({"w": np.arange(20, dtype=np.float32), "n": np.ones((2, 3), np.int8)}))
    if position < len(blob):
        blob[position] = byte
    blob = bytes(blob[:cut]) + garbage if cut < len(blob) else bytes(blob) + garbage
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(blob)
    try:
        tensors = read_safetensors(path)
    except CheckpointError:
        return
    for array in tensors.values():
        np.asarray(array).sum()


def test_writer_round_trips_and_the_package_reads_it(tmp_path):
    from safetensors.numpy import load_file
    from qlora_np.io.safetensors import save_safetensors

    arrays = {"w": np.arange(6, dtype=">f4").reshape(2, 3), "bf": np.ones(3, ml_dtypes.bfloat16),
              "empty": np.zeros((0, 2), np.int64), "flag": np.array([True, False])}
    path = tmp_path / "out.safetensors"
    save_safetensors(path, arrays, metadata={"format": "np"})
    for loaded in (read_safetensors(path), load_file(str(path))):
        for name, array in arrays.items():
            assert loaded[name].shape == array.shape
            np.testing.assert_array_equal(np.asarray(loaded[name], np.float64), array.astype(np.float64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]     # no temp file left


def test_writer_failure_keeps_the_old_file(tmp_path):
    from qlora_np.io.safetensors import save_safetensors

    path = tmp_path / "out.safetensors"
    save_safetensors(path, {"w": np.ones(2, np.float32)})
    before = path.read_bytes()
    try:
        save_safetensors(path, {"ok": np.ones(2, np.float32), "bad": np.array(["text"])})
    except CheckpointError:
        pass
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
