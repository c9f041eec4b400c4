"""Damaged copies of a folder of files, for the readers' fuzz tests."""

import functools

from hypothesis import strategies as st


@functools.lru_cache(maxsize=None)
def _original(path):
    return path.read_bytes()


def corrupted_copy(source, names, target, data, folder):
    """Copy ``names`` from ``source`` into ``folder``, then overwrite 1–6 bytes of ``target``
    and cut it somewhere in its second half (values drawn from hypothesis ``data``)."""
    for name in names:
        (folder / name).write_bytes(_original(source / name))
    blob = bytearray(_original(source / target))
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    (folder / target).write_bytes(bytes(blob[:data.draw(st.integers(len(blob) // 2, len(blob)))]))
    return folder
