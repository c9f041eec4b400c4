"""Products with a quantized weight W of shape (out, in), never materialised whole.

``matmul`` (x @ W.T, the forward), ``matmul_t`` (g @ W, the gradient to x) and their
low-rank fusions, for the CPU and the GPU. Which kernel runs for a call depends on its row
count, the weight and the CPU: :mod:`qlora_np.linalg.plan` decides it in one place.
"""

from typing import NamedTuple

import numpy as np
from scipy.linalg import get_blas_funcs

from qlora_np.dtypes import float_dtype_name
from qlora_np.errors import DeviceError, ShapeError, UnknownFormatError
from qlora_np.kernels import bf16, products
from qlora_np.kernels.blockwise import zero_shifts
from qlora_np.kernels.cuda.device import is_device_array
from qlora_np.kernels.x86.amx import empty_aligned
from qlora_np.kernels.x86.builder import decode_table
from qlora_np.linalg.plan import compute_dtype_name, int8_applies, plan_product
from qlora_np.quant.backends import get_backend, scales
from qlora_np.quant.tensor import QuantizedTensor

TILE_ELEMENTS = 1 << 22
"""Most weight elements the tiled products decode at a time (16 MiB of float32): bounds their
extra memory. Fewer rows of x use tiles down to a quarter of that (decoding then costs
as much as the product, and a smaller tile stays in cache)."""


def matmul(x, qt, backend="numba", int8_activations=False, compute_dtype="float32"):
    """``x @ W.T`` for a quantized Linear weight W (out, in): x (..., in) → (..., out) float32.

    A few rows (token-by-token decoding) use the fused kernel that never decodes W to
    memory; with AVX2, batches up to PANEL_MAX_ROWS decode W a small panel at a time and
    multiply it with every row; more rows decode W a tile of rows at a time and multiply
    each tile with BLAS.
    On the GPU (``qt.device == "cuda"``) the same choice is made in :mod:`qlora_np.kernels.cuda.kernels`
    and y is a device array; a host x is copied over.

    ``int8_activations=True`` lets the fused CPU kernel round x to int8 per group of 32
    and the codebook to int8 and multiply in integers, as llama.cpp does when decoding:
    faster than the exact fused kernel (a register holds four times as many int8 values as
    float32 ones), with a relative error of ~1e-2 (see
    :func:`qlora_np.linalg.reference.gemv_int8`). Other paths, and int4_asym, stay exact.

    ``compute_dtype="bfloat16"`` lets the products that use decoded tiles (more than
    PANEL_MAX_ROWS rows: training batches) round x and W to bfloat16 and sum in float32,
    as bitsandbytes does with that compute dtype: faster where the CPU has AVX-512 BF16 or
    AMX, which multiply bfloat16 pairs at twice the float32 rate (:mod:`qlora_np.kernels.bf16`),
    with the relative error of bfloat16 (~4e-3 a factor).
    Fewer rows stay exact: their fused and panel kernels are faster still, and so do the
    GPU kernels.
    """
    _weight_shape(qt)
    if qt.device == "cuda":
        compute_dtype_name(compute_dtype)                              # UnknownFormatError if unknown
        kernels = get_backend(backend, "cuda")
        x2d, lead = kernels.as_rows(x, qt.shape[1], "x")
        y = kernels.matmul(x2d, qt.packed, scales(qt), qt.zero_point, qt.codebook, qt.shape[0],
                           qt.blocksize)
        return y.reshape(lead + (qt.shape[0],))
    x2d, lead = _as_rows(x, qt, axis_size=qt.shape[1], name="x")
    out_features = qt.shape[0]
    kernel = plan_product("forward", x2d.shape[0], qt, compute_dtype, int8_activations, backend).kernel
    bfloat16 = compute_dtype_name(compute_dtype) == "bfloat16"
    if kernel == "panels":
        y = products.gemm(x2d, qt.packed, scales(qt), _shifts(qt), qt.codebook, out_features, qt.blocksize)
        return y.reshape(lead + (out_features,))
    if kernel in ("fused", "fused_int8"):
        return fused_matmul(x2d, qt, int8_activations).reshape(lead + (out_features,))
    if kernel == "bfloat16_panels":
        return _bfloat16_times_weight_t(bf16.rounded_rows(x2d), qt).reshape(lead + (out_features,))
    y = empty_aligned((x2d.shape[0], out_features), np.float32)      # (rows, out): tiles' rows on lines
    x_rounded = bf16.rounded_rows(x2d) if bfloat16 else None
    for row_start, tile in _weight_row_tiles(qt, backend, x2d.shape[0]):
        columns = slice(row_start, row_start + tile.shape[0])
        if bfloat16:
            bf16.matmul_bf16(x_rounded, tile.T, out=y[:, columns])
        else:
            y[:, columns] = x2d @ tile.T
    return y.reshape(lead + (out_features,))


def matmul_t(grad, qt, backend="numba", compute_dtype="float32"):
    """``grad @ W`` for a quantized Linear weight W (out, in): grad (..., out) → (..., in) float32.

    This is the product backpropagation needs to send a gradient through a frozen W.
    ``compute_dtype``: as in :func:`matmul`.
    """
    _weight_shape(qt)
    if qt.device == "cuda":
        compute_dtype_name(compute_dtype)                              # UnknownFormatError if unknown
        kernels = get_backend(backend, "cuda")
        g2d, lead = kernels.as_rows(grad, qt.shape[0], "grad")
        result = kernels.matmul_t(g2d, qt.packed, scales(qt), qt.zero_point, qt.codebook,
                                  qt.shape[1], qt.blocksize)
        return result.reshape(lead + (qt.shape[1],))
    g2d, lead = _as_rows(grad, qt, axis_size=qt.shape[0], name="grad")
    in_features = qt.shape[1]
    kernel = plan_product("transposed", g2d.shape[0], qt, compute_dtype, backend=backend).kernel
    bfloat16 = compute_dtype_name(compute_dtype) == "bfloat16"
    if kernel == "panels":
        result = products.gemm_t(g2d, qt.packed, scales(qt), _shifts(qt), qt.codebook, in_features,
                                 qt.blocksize)
        return result.reshape(lead + (in_features,))
    if kernel == "fused":
        result = products.gemv_t(g2d, qt.packed, scales(qt), _shifts(qt), qt.codebook,
                                 in_features, qt.blocksize)
        return result.reshape(lead + (in_features,))
    if kernel == "bfloat16_panels":
        return _bfloat16_times_weight(g2d, qt).reshape(lead + (in_features,))
    result = empty_aligned((g2d.shape[0], in_features), np.float32)  # (rows, in)
    partial = empty_aligned(result.shape, np.float32)                 # one product's worth, reused
    for row_start, tile in _weight_row_tiles(qt, backend, g2d.shape[0]):
        g_part = g2d[:, row_start:row_start + tile.shape[0]]
        product = result if row_start == 0 else partial               # the first tile's goes straight in
        if bfloat16:
            bf16.matmul_bf16(bf16.rounded_rows(g_part), tile, out=product)
        else:
            np.matmul(g_part, tile, out=product)
        if row_start:
            result += partial
    return result.reshape(lead + (in_features,))


class LowRankForward(NamedTuple):
    """What :func:`matmul_low_rank` gives back."""
    y: np.ndarray           # (rows, out) float32: x @ W.T + scale · h @ e
    h: np.ndarray           # (rows, r) float32: x @ a.T (or the h given)
    x_pairs: np.ndarray     # (rows, ≥ in/2) uint32: x's bfloat16 pairs where the product rounded x, else None


def matmul_low_rank(x, qt, a, e, scale=1.0, compute_dtype="float32", h=None):
    """``x @ W.T + scale · h @ e`` with h = x @ a.T, on the CPU: x (rows, in), a (r, in),
    e (r, out) → :class:`LowRankForward` (y, h and x's pairs). A LoRA layer's forward
    (a = A, e = B.T); a given ``h`` (rows, r) is used instead of x @ a.T (one made from a
    dropped-out x).

    Where :func:`matmul` multiplies in bfloat16 with W's panels decoded from its codes,
    every product reads x's pairs: h is their product with a's, and scale · h's pairs
    follow x's into the product with W's panels, whose rows e's pairs follow. The adapter
    then adds ~r/in to that product instead of three float32 passes over x and y; h, a and
    e are rounded to bfloat16 like x and W, as torch's autocast computes LoRA adapters.
    Elsewhere: :func:`matmul`, then float32 BLAS products.
    """
    x2d, a, e = _low_rank_operands(x, qt, a, e, qt.shape[1], qt.shape[0], "x")
    if h is not None:
        h = np.ascontiguousarray(h, np.float32)
        if h.shape != (x2d.shape[0], a.shape[0]):
            raise ShapeError(f"h must have shape {(x2d.shape[0], a.shape[0])}, got {h.shape}")
    if plan_product("forward", x2d.shape[0], qt, compute_dtype).kernel == "bfloat16_panels":
        pairs = bf16.rounded_rows(x2d, rank=a.shape[0])
        if h is None:
            h = bf16.matmul_bf16(pairs[:, :(qt.shape[1] + 1) // 2], a.T)
        bf16.put_low_rank(pairs, h, scale)
        return LowRankForward(_bfloat16_times_weight_t(pairs, qt, e), h, pairs)
    h = x2d @ a.T if h is None else h
    y = matmul(x2d, qt, compute_dtype=compute_dtype)
    add_low_rank_product(y, scale, h, e)
    return LowRankForward(y, h, None)


class LowRankBackward(NamedTuple):
    """What :func:`matmul_t_low_rank` gives back."""
    grad: np.ndarray        # (rows, in) float32: grad @ W + scale · h @ e
    h: np.ndarray           # (rows, r) float32: grad @ a.T
    grad_pairs: np.ndarray  # (rows, ≥ out/2) uint32: grad's bfloat16 pairs where the product rounded all of it, else None


def matmul_t_low_rank(grad, qt, a, e, scale=1.0, compute_dtype="float32"):
    """``grad @ W + scale · h @ e`` with h = grad @ a.T, on the CPU: grad (rows, out),
    a (r, out), e (r, in) → :class:`LowRankBackward` (the result, h and grad's pairs). A
    LoRA layer's gradient to x (a = B.T, e = A), in the products :func:`matmul_low_rank`
    describes."""
    g2d, a, e = _low_rank_operands(grad, qt, a, e, qt.shape[0], qt.shape[1], "grad")
    if plan_product("transposed", g2d.shape[0], qt, compute_dtype).kernel == "bfloat16_panels":
        return LowRankBackward(*_bfloat16_times_weight(g2d, qt, a, e, scale))
    h = g2d @ a.T
    result = matmul_t(g2d, qt, compute_dtype=compute_dtype)
    add_low_rank_product(result, scale, h, e)
    return LowRankBackward(result, h, None)


def add_low_rank_product(y, alpha, a, b):
    """y += alpha · (a @ b) in place for a thin a (m, r) and b (r, n), y (m, n) C-contiguous:
    one BLAS gemm with beta = 1 (on y.T, which is Fortran-ordered), where NumPy would make
    an (m, n) temporary, add it in a second pass, and run its own thin product, which is not
    tuned for so small an r."""
    gemm = get_blas_funcs("gemm", (y,))
    result = gemm(alpha, b, a.T, beta=1.0, c=y.T, overwrite_c=True, trans_a=True)      # (n, m)
    if not np.shares_memory(result, y):                  # gemm had to copy (it does not for these)
        y[...] = result.T


def _low_rank_operands(x, qt, a, e, inner, outer, name):
    """x (rows, inner), a (r, inner), e (r, outer) as C-contiguous float32 for a low-rank product on the CPU."""
    _weight_shape(qt)
    if qt.device != "cpu":
        raise DeviceError(f"the low-rank products run on the CPU; the weight is on {qt.device}")
    x, a, e = (np.ascontiguousarray(v, np.float32) for v in (x, a, e))
    if x.ndim != 2 or x.shape[1] != inner or a.shape[1:] != (inner,) or e.shape != (a.shape[0], outer):
        raise ShapeError(f"{name} (rows, {inner}), a (r, {inner}) and e (r, {outer}) do not fit: "
                         f"{x.shape}, {a.shape}, {e.shape}")
    return x, a, e


def _bfloat16_times_weight_t(x_pairs, qt, e=None):
    """x @ W.T (+ h @ e, h's pairs after x's) in bfloat16, W's panels decoded from its codes
    a range of its rows at a time."""
    y = empty_aligned((x_pairs.shape[0], qt.shape[0]), np.float32)  # (rows, out): tiles' rows on lines
    weight = _bfloat16_weight(qt)
    for row_start, count in _weight_row_ranges(qt):
        bf16.times_weight_t(x_pairs, weight, row_start, count, y[:, row_start:row_start + count], e)
    return y


def _bfloat16_times_weight(g2d, qt, a=None, e=None, scale=1.0):
    """g @ W in bfloat16, W's panels decoded from its codes a range of its rows at a time and
    each range's products summed; with a and e, (the sum plus scale · h @ e, h = g @ a.T,
    g's pairs or None), h's pairs riding with the first range's (h from g's pairs where
    there is one range)."""
    weight, ranges = _bfloat16_weight(qt), list(_weight_row_ranges(qt))
    result = empty_aligned((g2d.shape[0], qt.shape[1]), np.float32)  # (rows, in)
    partial = empty_aligned(result.shape, np.float32) if len(ranges) > 1 else None   # a range's, reused
    h = None
    for row_start, count in ranges:
        rank = 0 if a is None or row_start else a.shape[0]
        pairs = bf16.rounded_rows(g2d[:, row_start:row_start + count], rank=rank)
        if rank:
            h = bf16.matmul_bf16(pairs[:, :(count + 1) // 2], a.T) if len(ranges) == 1 else g2d @ a.T
            bf16.put_low_rank(pairs, h, scale)
        bf16.times_weight(pairs, weight, row_start, count, partial if row_start else result, e if rank else None)
        if row_start:
            result += partial
    return result if a is None else (result, h, pairs if len(ranges) == 1 else None)


def fused_matmul(x2d, qt, int8_activations=False):
    """x2d (rows, in) float32 @ W.T on the fused kernel, without checking the arguments.

    :func:`~qlora_np.linalg.plan.plan_product` says when it applies; ``int8_activations``: see :func:`matmul`.
    """
    if int8_activations and int8_applies(qt):
        return fused_product([qt], int8_activations)(x2d)
    return products.gemv(x2d, qt.packed, scales(qt), _shifts(qt), qt.codebook, qt.shape[0],
                         qt.blocksize)


def fused_product(weights, int8_activations=False):
    """A prepared :class:`~qlora_np.kernels.products.FusedProduct` x → x @ [W_1; …; W_k].T for weights
    that share x (q, k and v), to call once per token; :func:`fuse_together` says when it applies."""
    first = weights[0]
    return products.FusedProduct([(qt.packed, scales(qt), qt.shape[0]) for qt in weights], first.codebook,
                                 first.blocksize, first.shape[1], int8_activations=int8_activations)


def _shifts(qt):
    """int4_asym zero points as float32 (the fused kernels subtract them), else None."""
    return None if qt.zero_point is None else qt.zero_point.astype(np.float32)


def _weight_shape(qt):
    if not isinstance(qt, QuantizedTensor):
        raise UnknownFormatError(f"expected a QuantizedTensor weight, got {type(qt).__name__}")
    if len(qt.shape) != 2:
        raise ShapeError(f"a Linear weight must be 2-D (out, in), got shape {qt.shape}")
    return qt.shape


def _as_rows(array, qt, axis_size, name):
    """(..., k) float array → ((rows, k) float32, leading shape), checking k."""
    if is_device_array(array):
        raise DeviceError(f"{name} is on the GPU but the weight is on the CPU; move one of them with .to()")
    array = np.asarray(array)
    float_dtype_name(array.dtype)                                      # DTypeError unless float
    if array.ndim == 0 or array.shape[-1] != axis_size:
        raise ShapeError(f"{name} must have last dimension {axis_size} to multiply the weight of "
                         f"shape {qt.shape}, got shape {array.shape}")
    return np.ascontiguousarray(array.reshape(-1, axis_size), dtype=np.float32), array.shape[:-1]


def _bfloat16_weight(qt):
    """qt as :class:`qlora_np.kernels.bf16.Weight4bit`: what those panel decoders read."""
    block_scales = scales(qt)
    shifts = zero_shifts(block_scales.size) if qt.zero_point is None else _shifts(qt)
    return bf16.Weight4bit(qt.packed, block_scales, shifts, decode_table(qt.codebook), qt.blocksize, qt.shape)


def _weight_row_ranges(qt):
    """(first_row, rows) over W's rows, TILE_ELEMENTS at most and whole panels (an even
    count: g's pairs never straddle two ranges), for the products decoding panels."""
    rows_per_range = max(bf16.PANEL, TILE_ELEMENTS // qt.shape[1] // bf16.PANEL * bf16.PANEL)
    for row_start in range(0, qt.shape[0], rows_per_range):
        yield row_start, min(rows_per_range, qt.shape[0] - row_start)


def _weight_row_tiles(qt, backend, batch_rows):
    """Yield (first_row, W[first_row:first_row + r] as (r, in) float32) over the weight's rows.

    Tiles hold at most TILE_ELEMENTS values (fewer for small batches) and, when
    possible, start on block boundaries so the fast decoder can be used.
    """
    kernels = get_backend(backend)
    one_thread = {} if backend == "reference" else {"parallel": False}     # see dequantize_4bit
    out_features, in_features = qt.shape
    block_scales = scales(qt, backend)
    tile_elements = min(TILE_ELEMENTS, max(TILE_ELEMENTS // 4, batch_rows * 4096))
    rows_per_tile = max(1, tile_elements // in_features)
    align = qt.blocksize // np.gcd(qt.blocksize, in_features)        # rows per block boundary
    if align <= rows_per_tile:
        rows_per_tile -= rows_per_tile % align
    for row_start in range(0, out_features, rows_per_tile):
        rows = min(rows_per_tile, out_features - row_start)
        tile = kernels.dequantize_4bit(qt.packed, block_scales, qt.zero_point, rows * in_features,
                                       qt.blocksize, qt.codebook, start=row_start * in_features,
                                       **one_thread)
        yield row_start, tile.reshape(rows, in_features)
