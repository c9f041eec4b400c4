"""The whole product dispatch in one table: which kernel :func:`qlora_np.linalg.plan.plan_product`
picks for every set of CPU features, row count, product and compute dtype, and that the products
run exactly what it (and :func:`qlora_np.explain`) says."""

import numpy as np
import pytest

import qlora_np
from qlora_np.kernels import features
from qlora_np.linalg import plan, products

FEATURE_SETS = {
    "none": dict(HAS_AVX2=False, HAS_AVX512=False, PERMUTE_DECODE=False, HAS_AVX512_BF16=False, USE_AMX=False),
    "AVX2": dict(HAS_AVX2=True, HAS_AVX512=False, PERMUTE_DECODE=False, HAS_AVX512_BF16=False, USE_AMX=False),
    "AVX-512": dict(HAS_AVX2=True, HAS_AVX512=True, PERMUTE_DECODE=True, HAS_AVX512_BF16=False, USE_AMX=False),
    "AVX-512 BF16": dict(HAS_AVX2=True, HAS_AVX512=True, PERMUTE_DECODE=True, HAS_AVX512_BF16=True, USE_AMX=False),
    "AMX": dict(HAS_AVX2=True, HAS_AVX512=True, PERMUTE_DECODE=True, HAS_AVX512_BF16=True, USE_AMX=True),
}
"""Consistent feature sets, each a superset of the one before."""

ROWS = (1, 20, 300)
CASES = [(product, dtype) for product in plan.PRODUCTS for dtype in plan.COMPUTE_DTYPES]

EXPECTED = {   # features → {(product, compute dtype): kernel for 1, 20, 300 rows}; W (128, 256), blocksize 64
    "none": {("forward", "float32"): ("fused", "fused", "tiles"),
             ("forward", "bfloat16"): ("fused", "fused", "tiles"),
             ("transposed", "float32"): ("fused", "tiles", "tiles"),
             ("transposed", "bfloat16"): ("fused", "tiles", "tiles")},
    "AVX2": {(p, d): ("fused", "panels", "tiles") for p, d in CASES},
    "AVX-512": {(p, d): ("fused", "panels", "tiles") for p, d in CASES},
    "AVX-512 BF16": {(p, d): ("fused", "panels", "bfloat16_panels" if d == "bfloat16" else "tiles")
                     for p, d in CASES},
    "AMX": {(p, d): ("fused", "panels", "bfloat16_panels" if d == "bfloat16" else "tiles") for p, d in CASES},
}


@pytest.fixture(scope="module")
def weight():
    return qlora_np.quantize(np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32))


def dispatch_table(qt, monkeypatch):
    """{features: {(product, dtype): kernels for ROWS}} under each feature set."""
    table = {}
    for name, flags in FEATURE_SETS.items():
        for flag, value in flags.items():
            monkeypatch.setattr(features, flag, value)
        table[name] = {(p, d): tuple(plan.plan_product(p, rows, qt, d).kernel for rows in ROWS) for p, d in CASES}
    return table


def render_markdown(table):
    """The dispatch table as markdown, one row per feature set and product (for ARCHITECTURE.md)."""
    lines = ["| CPU features | product | compute dtype | " + " | ".join(f"{r} rows" for r in ROWS) + " |",
             "|---|---|---|" + "---|" * len(ROWS)]
    for name, cases in table.items():
        for (product, dtype), kernels in cases.items():
            lines.append(f"| {name} | {product} | {dtype} | " + " | ".join(kernels) + " |")
    return "\n".join(lines)


def test_the_dispatch_table(weight, monkeypatch):
    table = dispatch_table(weight, monkeypatch)
    assert table == EXPECTED, render_markdown(table)


def test_int8_activations_keep_the_fused_kernel_where_panels_would_run(weight, monkeypatch):
    monkeypatch.setattr(features, "HAS_AVX2", True)
    assert plan.plan_product("forward", 20, weight, int8_activations=True).kernel == "fused_int8"
    assert plan.plan_product("forward", 100, weight, int8_activations=True).kernel == "panels"
    assert plan.plan_product("transposed", 1, weight, int8_activations=True).kernel == "fused"


def test_the_reference_backend_and_odd_weights_use_tiles(weight):
    odd = qlora_np.quantize(np.ones((8, 100), np.float32), blocksize=64)          # rows not whole blocks
    assert plan.plan_product("forward", 1, weight, backend="reference").kernel == "tiles"
    assert plan.plan_product("forward", 1, odd).kernel == "tiles"
    assert "do not take shape (8, 100)" in plan.plan_product("forward", 1, odd).reason


def test_an_unknown_product_or_compute_dtype_is_refused(weight):
    with pytest.raises(qlora_np.UnknownFormatError):
        plan.plan_product("sideways", 1, weight)
    with pytest.raises(qlora_np.UnknownFormatError):
        plan.plan_product("forward", 1, weight, compute_dtype="float8")


def _recorder(monkeypatch):
    """Wrap each kernel entry of the products so a call says which one ran."""
    ran = []
    for name, kernel in [("gemm", "panels"), ("gemm_t", "panels"), ("gemv", "fused"), ("gemv_t", "fused")]:
        original = getattr(products.products, name)
        monkeypatch.setattr(products.products, name,
                            lambda *a, _o=original, _k=kernel, **k: ran.append(_k) or _o(*a, **k))
    for name, kernel in [("_bfloat16_times_weight_t", "bfloat16_panels"), ("_bfloat16_times_weight", "bfloat16_panels"),
                         ("_weight_row_tiles", "tiles")]:
        original = getattr(products, name)
        monkeypatch.setattr(products, name, lambda *a, _o=original, _k=kernel, **k: ran.append(_k) or _o(*a, **k))
    return ran


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("compute_dtype", plan.COMPUTE_DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_explain_names_the_kernel_the_product_runs(weight, monkeypatch, rows, compute_dtype, transposed):
    ran = _recorder(monkeypatch)
    x = np.ones((rows, 128 if transposed else 256), np.float32)
    said = qlora_np.explain(x, weight, compute_dtype, transposed=transposed)
    (qlora_np.matmul_t if transposed else qlora_np.matmul)(x, weight, compute_dtype=compute_dtype)
    assert ran and said.split(":")[0] == ran[0]
