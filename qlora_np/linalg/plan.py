"""Which kernel a product with a packed weight W runs, decided in one place.

:func:`plan_product` looks at the call (which product, how many rows, the compute dtype,
int8 activations, the backend), the weight (its device, shape and block size) and the CPU's
features (:mod:`qlora_np.kernels.features`), and returns a :class:`Plan`: the kernel's name
and the reason in words. :func:`qlora_np.linalg.products.matmul`, ``matmul_t`` and the
low-rank fusions run what it says; :func:`explain` shows it to a user.

The order, for x @ W.T ("forward") and g @ W ("transposed"):

1. a weight on the GPU runs the numba.cuda kernels;
2. ``panels`` — from FUSED_MAX_ROWS_T + 1 to PANEL_MAX_ROWS rows with AVX2: W decoded a panel
   at a time, once for all rows (int8 activations keep the fused kernel instead);
3. ``fused`` / ``fused_int8`` — up to FUSED_MAX_ROWS rows (FUSED_MAX_ROWS_T for g @ W):
   codes decoded in registers, W never in memory;
4. ``bfloat16_panels`` — ``compute_dtype="bfloat16"`` with AVX-512 BF16 or AMX: W's panels
   decoded from its codes into bfloat16 and multiplied in tiles; a LoRA term rides along;
5. ``tiles`` — otherwise: W decoded a tile of rows at a time, multiplied by BLAS (on
   bfloat16-rounded values with ``compute_dtype="bfloat16"``).
"""

from typing import NamedTuple

import numpy as np

from qlora_np.errors import UnknownFormatError
from qlora_np.kernels import bf16, features, products

PRODUCTS = ("forward", "transposed")


FUSED_MAX_ROWS = 64
"""Up to this many rows of x, the products decode W in registers (:mod:`qlora_np.kernels.products`);
the fused kernels share each decode among 4 rows, so they beat decode-a-tile + BLAS until
the batch is large enough for BLAS's compute efficiency to win."""


FUSED_MAX_ROWS_T = 8
"""The same limit for g @ W: its fused kernel streams a row of the result per row of g
through the cache for every weight row, so it pays off for fewer rows."""


PANEL_MAX_ROWS = 256
"""With AVX2, from FUSED_MAX_ROWS_T + 1 up to this many rows both products decode W a panel
at a time (:func:`qlora_np.kernels.products.gemm` / ``gemm_t``): each panel is decoded once for all
rows and multiplied from the cache in register tiles, where the fused kernels decode it again
for every 4 rows and decode + BLAS writes a whole tile out first; beyond it, the decode is a
small share of the work and BLAS's tuned kernels on decoded tiles win
(``benchmarks/compare.py`` measures the crossover)."""


COMPUTE_DTYPES = ("float32", "bfloat16")
"""What the large products may multiply in (``compute_dtype``), as bitsandbytes' ``compute_dtype``."""


def compute_dtype_name(compute_dtype):
    """The name in COMPUTE_DTYPES of ``compute_dtype`` (that name or NumPy's float32)."""
    try:
        name = compute_dtype if isinstance(compute_dtype, str) else np.dtype(compute_dtype).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise UnknownFormatError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    return name


def uses_fused(rows, qt, backend="numba", max_rows=FUSED_MAX_ROWS):
    """Whether a product with ``rows`` rows and weight ``qt`` runs on the fused kernels."""
    return backend == "numba" and rows <= max_rows and products.supports(qt.shape, qt.blocksize)


def uses_panels(rows, qt, backend="numba"):
    """Whether a product with ``rows`` rows and weight ``qt`` runs on the AVX2 panel kernels."""
    return (backend == "numba" and FUSED_MAX_ROWS_T < rows <= PANEL_MAX_ROWS
            and products.supports(qt.shape, qt.blocksize) and products.simd_applies(qt.blocksize))


def fuse_together(rows, weights, int8_activations=False):
    """Whether :func:`fused_product` applies: fused-size products, one format, no zero points
    (and, for int8 activations, whole groups of 32)."""
    first = weights[0]
    return all(uses_fused(rows, qt) and qt.zero_point is None and qt.shape[1] == first.shape[1]
               and qt.blocksize == first.blocksize and qt.codebook.tobytes() == first.codebook.tobytes()
               and (not int8_activations or int8_applies(qt))
               for qt in weights)


def int8_applies(qt):
    return qt.zero_point is None and products.int8_supports(qt.shape[1], qt.blocksize)


def decodes_in_bfloat16(qt, backend):
    """Whether the bfloat16 products decode W's panels straight from its codes
    (:func:`qlora_np.kernels.bf16.decodes_4bit`)."""
    return backend == "numba" and bf16.decodes_4bit(qt.shape, qt.blocksize)


class Plan(NamedTuple):
    """A product's kernel and why it was chosen."""
    kernel: str         # "cuda", "panels", "fused", "fused_int8", "bfloat16_panels" or "tiles"
    reason: str


def plan_product(product, rows, qt, compute_dtype="float32", int8_activations=False, backend="numba"):
    """The :class:`Plan` for ``product`` ("forward": x @ W.T, "transposed": g @ W) with ``rows``
    rows and the weight ``qt``, in the order of this module's docstring."""
    if product not in PRODUCTS:
        raise UnknownFormatError(f"product must be one of {PRODUCTS}, got {product!r}")
    bfloat16 = compute_dtype_name(compute_dtype) == "bfloat16"
    if qt.device == "cuda":
        return Plan("cuda", "the weight is on the GPU: numba.cuda kernels")
    fused_max_rows = FUSED_MAX_ROWS if product == "forward" else FUSED_MAX_ROWS_T
    int8 = product == "forward" and int8_activations and int8_applies(qt)
    if uses_panels(rows, qt, backend) and not (int8 and uses_fused(rows, qt, backend)):
        return Plan("panels", f"{FUSED_MAX_ROWS_T} < rows={rows} <= PANEL_MAX_ROWS={PANEL_MAX_ROWS} with "
                              "AVX2: W decoded a panel at a time for all rows")
    if uses_fused(rows, qt, backend, fused_max_rows):
        if int8:
            return Plan("fused_int8", f"rows={rows} <= {fused_max_rows}, int8 activations: codes decoded in "
                                      "registers, x and the codebook in int8")
        return Plan("fused", f"rows={rows} <= {fused_max_rows}: codes decoded in registers, W never in memory")
    why = _why_not_fused(rows, qt, backend, fused_max_rows)
    if bfloat16 and decodes_in_bfloat16(qt, backend):
        tiles = "AMX tiles where the OS permits them, else AVX-512 BF16" if features.USE_AMX else "AVX-512 BF16"
        return Plan("bfloat16_panels", f"{why}; bfloat16 on {tiles}: W's panels decoded from its codes, "
                                       "bfloat16 tile products")
    how = "bfloat16-rounded values times BLAS" if bfloat16 else "float32 BLAS"
    return Plan("tiles", f"{why}; W decoded a tile of rows at a time, {how}")


def _why_not_fused(rows, qt, backend, fused_max_rows):
    if backend != "numba":
        return f"backend {backend!r}"
    if not products.supports(qt.shape, qt.blocksize):
        return f"the fused kernels do not take shape {qt.shape} with blocksize {qt.blocksize}"
    return f"rows={rows} > {fused_max_rows}" if rows > PANEL_MAX_ROWS or not features.HAS_AVX2 \
        else f"rows={rows}, no AVX2 panels for blocksize {qt.blocksize}"


def explain(x, qt, compute_dtype="float32", transposed=False, int8_activations=False, backend="numba"):
    """In words, which kernel ``matmul(x, qt)`` (or ``matmul_t`` with ``transposed=True``) runs
    and why, e.g. "fused: rows=1 <= 64: codes decoded in registers, W never in memory"."""
    shape = np.shape(x)
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) else 1
    plan = plan_product("transposed" if transposed else "forward", rows, qt, compute_dtype,
                        int8_activations, backend)
    return f"{plan.kernel}: {plan.reason}"
