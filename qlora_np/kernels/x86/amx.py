"""Intel AMX tiles for the bfloat16 products of :mod:`qlora_np.kernels.bf16`: the same pairs and panels,
multiplied 16 × 16 sums at a time.

Sapphire Rapids and later Xeons have eight tile registers of 16 rows × 64 bytes and
``tdpbf16ps``, which adds a 16 × 32 bfloat16 tile times a 32 × 16 one into a 16 × 16 float32
tile: 8,192 multiply-adds an instruction, against 32 for ``vdpbf16ps``.

The panels of :mod:`qlora_np.kernels.bf16` are already in the layout a tile wants (``panel[j, c]`` the pair
of rows 2j, 2j + 1 in column c): 16 pair-rows of a panel's first or last 16 columns are a
B tile. A block of 32 rows of a's pairs times one panel keeps its four 16 × 16 sums in
tiles 0–3 and loads two A tiles (4, 5) and two B tiles (6, 7) per 16 pairs of k.

The sums are not those of ``vdpbf16ps`` bit for bit: the tile orders and rounds its
additions its own way (against exact sums its error is smaller than the AVX-512 tile's).
Each row's sums still depend on nothing
but that row, so a block's padding rows, the thread count and the order of tasks never
change a value.

Linux lets a process use the tiles only once it asks for their state
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); :func:`fits` asks once, the first
time a product could take the tiles (:func:`qlora_np.kernels.features.amx_permitted`).
Set ``QLORA_NP_AMX=0`` in the environment, or :data:`qlora_np.kernels.features.USE_AMX` False,
to keep the AVX-512 tile.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from qlora_np.kernels import features

BLOCK_ROWS = 32
"""Rows of a one block multiplies with a panel (two A tiles of 16 rows)."""

STEP_PAIRS = 16
"""Pairs of k one A tile holds (64 bytes a row): k/2 must be a multiple of it."""

CHUNK_STEPS = 6
"""Steps of k a block of rows takes with each panel of a group before the next chunk:
32 rows × 96 pairs of a (12 KB) stay in the L1 cache while the group's panels go by."""

GROUP = 32
"""At most this many panels are multiplied chunk by chunk with the same rows: their
32 × 1024 sums (128 KB, in L2) are stored and loaded again between chunks, and the rows
are read once per group, not once per panel. The sums are the same bit for bit: a tile rounds once per instruction, so where they
pause between chunks changes nothing."""

CACHE_LINE = 64
"""Bytes a cache line holds, and a tile row: operands start on a line (:func:`empty_aligned`)."""

GROUP_BYTES = 1 << 20
"""...and at most as many as fit in this many bytes (half of a 2 MiB L2), at least 4: the
group's panels stay in L2 while every block of rows goes by (at k = 2048, 32 panels are
8 MiB and would leave it)."""


def fits(depth):
    """Whether a product with ``depth`` pairs of k goes through the tiles: wanted
    (:data:`qlora_np.kernels.features.USE_AMX`), whole tile steps of k, and the tile state
    permitted (asked here, the first time, just before an AMX kernel would run)."""
    return features.USE_AMX and depth % STEP_PAIRS == 0 and features.amx_permitted()


# ---------------------------------------------------------------------------
# The instructions (inline assembly: tile registers are named, not allocated)
# ---------------------------------------------------------------------------

_I64 = ir.IntType(64)
# LLVM assembles these whatever CPU it compiles for (checked with NUMBA_CPU_NAME=znver4 and
# generic), so a kernel may hold an AMX branch and an AVX-512 one and pick at run time.


def _emit(builder, text, constraints="", operands=()):
    """One instruction as inline assembly with side effects (kept, and kept in order)."""
    function = ir.FunctionType(ir.VoidType(), [operand.type for operand in operands])
    builder.call(ir.InlineAsm(function, text, constraints + "~{memory}", side_effect=True), list(operands))


@intrinsic
def _configure(typingctx, config_at):
    """ldtilecfg: load the 64-byte tile configuration at ``config_at``."""
    def codegen(context, builder, sig, args):
        _emit(builder, "ldtilecfg ($0)", "r,", [builder.inttoptr(args[0], ir.IntType(8).as_pointer())])
        return context.get_dummy_value()
    return types.void(types.intp), codegen


@intrinsic
def _release(typingctx):
    """tilerelease: hand the tile state back (a thread switch then saves no tiles)."""
    def codegen(context, builder, sig, args):
        _emit(builder, "tilerelease")
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _block(typingctx, a_at, a_stride, panel_at, steps, c_at, c_stride, accumulate):
    """c[0:32, 0:32] (+)= a[0:32] @ panel: a 32 rows of pairs (byte stride a_stride), the panel
    16·steps pair-rows of 128 bytes, c 32 rows of 32 float32 (byte stride c_stride); the sums
    start from c where ``accumulate`` is nonzero, else from zero."""
    def codegen(context, builder, sig, args):
        a_at, a_stride, panel_at, steps, c_at, c_stride, accumulate = args

        def plus(at, offset):
            return builder.add(at, offset if isinstance(offset, ir.Value) else ir.Constant(_I64, offset))

        sixteen_rows_of_a = builder.mul(a_stride, ir.Constant(_I64, 16))
        panel_stride = ir.Constant(_I64, 128)
        c_lower = plus(c_at, builder.mul(c_stride, ir.Constant(_I64, 16)))
        c_tiles = (c_at, plus(c_at, 64), c_lower, plus(c_lower, 64))            # tiles 0–3: the sums
        with builder.if_else(builder.icmp_signed("!=", accumulate, ir.Constant(_I64, 0))) as (go_on, start):
            with go_on:
                for sums, at in enumerate(c_tiles):
                    _emit(builder, f"tileloadd ($0,$1,1), %tmm{sums}", "r,r,", [at, c_stride])
            with start:
                for sums in range(4):
                    _emit(builder, f"tilezero %tmm{sums}")
        with cgutils.for_range(builder, steps) as loop:
            a_top = plus(a_at, builder.mul(loop.index, ir.Constant(_I64, 4 * STEP_PAIRS)))
            b_top = plus(panel_at, builder.mul(loop.index, ir.Constant(_I64, STEP_PAIRS * 128)))
            for tile, at, stride in ((4, a_top, a_stride), (5, plus(a_top, sixteen_rows_of_a), a_stride),
                                     (6, b_top, panel_stride), (7, plus(b_top, 64), panel_stride)):
                _emit(builder, f"tileloadd ($0,$1,1), %tmm{tile}", "r,r,", [at, stride])
            for sums, a_tile, b_tile in ((0, 4, 6), (1, 4, 7), (2, 5, 6), (3, 5, 7)):
                _emit(builder, f"tdpbf16ps %tmm{b_tile}, %tmm{a_tile}, %tmm{sums}")
        for sums, at in enumerate(c_tiles):
            _emit(builder, f"tilestored %tmm{sums}, ($0,$1,1)", "r,r,", [at, c_stride])
        return context.get_dummy_value()
    return types.void(*([types.intp] * 7)), codegen


def empty_aligned(shape, dtype):
    """``np.empty(shape, dtype)`` starting on a cache line. NumPy and Numba start arrays on
    16 or 32 bytes, so every 64-byte tile row would straddle two lines and each tile load
    would touch twice the lines (benchmarks/README.md has the cost).
    (Callable from Python and, through its overload, from Numba kernels.)"""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    spare = np.empty(count * dtype.itemsize + CACHE_LINE, np.uint8)
    skip = -spare.ctypes.data % CACHE_LINE
    return spare[skip:skip + count * dtype.itemsize].view(dtype).reshape(shape)


@overload(empty_aligned)
def _empty_aligned_in_numba(shape, dtype):
    def empty_aligned_in_numba(shape, dtype):
        count = 1
        for size in shape:
            count *= size
        itemsize = np.empty(0, dtype).itemsize
        spare = np.empty(count + CACHE_LINE // itemsize, dtype)
        skip = (-spare.ctypes.data) % CACHE_LINE // itemsize
        return spare[skip:skip + count].reshape(shape)
    return empty_aligned_in_numba


def zeros_aligned(shape, dtype):
    """``np.zeros(shape, dtype)`` starting on a cache line (:func:`empty_aligned`)."""
    array = empty_aligned(shape, dtype)
    array[...] = 0
    return array


@overload(zeros_aligned)
def _zeros_aligned_in_numba(shape, dtype):
    def zeros_aligned_in_numba(shape, dtype):
        array = empty_aligned(shape, dtype)
        array.reshape(-1)[:] = 0
        return array
    return zeros_aligned_in_numba


# ---------------------------------------------------------------------------
# Rows of a times panels
# ---------------------------------------------------------------------------

@njit(cache=True)
def tile_config():
    """The tile configuration these kernels use: palette 1, tiles 0–7 all 16 rows × 64 bytes."""
    config = np.zeros(64, np.uint8)
    config[0] = 1
    for tile in range(8):
        config[16 + 2 * tile] = 64                  # bytes a row (little-endian uint16)
        config[48 + tile] = 16                      # rows
    return config


@njit(cache=True, inline="always")
def start(config):
    """Load ``config`` (:func:`tile_config`) on this thread, before its first product."""
    _configure(config.ctypes.data)


@njit(cache=True, inline="always")
def stop():
    """Release the tiles on this thread."""
    _release()


@njit(cache=True, inline="always")
def _rows_block(a_at, a_stride, panels, c_at, c_stride, depth):
    """32 rows of c (c_at, byte stride c_stride) = 32 rows of pairs @ each of ``panels``
    (count ≤ GROUP, depth, 32), in chunks of CHUNK_STEPS steps of k: each chunk of the rows
    is multiplied with the same chunk of every panel while it is in the L1 cache."""
    chunk = CHUNK_STEPS * STEP_PAIRS
    for first in range(0, depth, chunk):
        steps = min(chunk, depth - first) // STEP_PAIRS
        for p in range(panels.shape[0]):
            _block(a_at + 4 * first, a_stride, panels[p].ctypes.data + 128 * first, steps,
                   c_at + 128 * p, c_stride, first)


@njit(cache=True, inline="always")
def rows_times_panels(pairs, panels, c):
    """c (rows, 32 · count) float32, unit column stride = pairs (rows, depth) uint32,
    contiguous rows @ panels (count, depth, 32) uint32, each contiguous, side by side;
    depth a multiple of STEP_PAIRS, tiles started (:func:`start`). A group of panels at a
    time (GROUP, GROUP_BYTES); a last partial block of rows goes through zero-padded spares."""
    rows, depth = pairs.shape
    whole = rows - rows % BLOCK_ROWS
    size = max(4, min(GROUP, GROUP_BYTES // (128 * depth)))
    spare_a = empty_aligned((BLOCK_ROWS if whole < rows else 0, depth), np.uint32)    # the last rows,
    spare_a[: rows - whole] = pairs[whole:]
    spare_a[rows - whole:] = 0                                                          # padded
    spare_c = empty_aligned((spare_a.shape[0], 32 * size), np.float32)
    for p in range(0, panels.shape[0], size):
        group = panels[p:p + size]
        for r in range(0, whole, BLOCK_ROWS):
            _rows_block(pairs.ctypes.data + r * pairs.strides[0], pairs.strides[0], group,
                        c.ctypes.data + r * c.strides[0] + 128 * p, c.strides[0], depth)
        if whole < rows:
            _rows_block(spare_a.ctypes.data, spare_a.strides[0], group, spare_c.ctypes.data,
                        spare_c.strides[0], depth)
            c[whole:, 32 * p:32 * (p + group.shape[0])] = spare_c[: rows - whole, :32 * group.shape[0]]
