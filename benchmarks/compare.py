"""Side-by-side timings in one run: qlora_np kernels against NumPy baselines.

    python benchmarks/compare.py [--side 4096] [--repeat 15]

Prints the machine, then for each operation the median time, the baseline it is
measured against, their ratio and whether the issue's target holds; last, a 1024-row
training batch in float32 and with ``compute_dtype="bfloat16"``. When
bitsandbytes (with torch) happens to be installed its CPU quantize/dequantize are
timed too. The asv suites in this folder track the same operations over commits.
"""

import os

try:                                  # the process settings the CLI uses, before NumPy loads OpenBLAS
    from qlora_np import runtime
    runtime.configure()
except ImportError:                   # for comparing with a tree from before the redesign (no runtime)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import argparse  # noqa: E402
import platform  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

import qlora_np  # noqa: E402
from results import cpu_model, write_results  # noqa: E402  (benchmarks/ is the script's folder)
from timing import interleaved_medians, median_seconds  # noqa: E402


def bfloat16_tiles():
    """Which kernel multiplies in bfloat16 here: AMX tiles, the AVX-512 BF16 tile, or BLAS."""
    try:
        from qlora_np.kernels import features
    except ImportError:               # a tree from before the redesign kept the flags in its kernels
        from qlora_np.kernels import amx, bf16
        return "AMX" if amx.USE_AMX else "AVX-512 BF16" if bf16.HAS_AVX512_BF16 else "BLAS on rounded values"
    return "AMX" if features.USE_AMX and features.amx_permitted() else "AVX-512 BF16" if features.HAS_AVX512_BF16 else "BLAS on rounded values"


def machine_line():
    return (f"{cpu_model()}, {os.cpu_count()} logical cores, Numba {numba.__version__} "
            f"({numba.get_num_threads()} threads), NumPy {np.__version__}, "
            f"Python {platform.python_version()}")


def bitsandbytes_rows(weight, repeat):
    """(name, seconds) for bitsandbytes' CPU NF4 quantize/dequantize, or [] if it is absent."""
    try:
        import bitsandbytes.functional as bnb_functional
        import torch
    except ImportError:
        return []
    import bitsandbytes
    tensor = torch.from_numpy(weight)
    packed, state = bnb_functional.quantize_4bit(tensor, blocksize=64, quant_type="nf4")
    x = torch.ones((1, weight.shape[1]))
    return [
        ("bitsandbytes quantize nf4", median_seconds(
            lambda: bnb_functional.quantize_4bit(tensor, blocksize=64, quant_type="nf4"), repeat)),
        ("bitsandbytes dequantize nf4", median_seconds(
            lambda: bnb_functional.dequantize_4bit(packed, state), repeat)),
        ("bitsandbytes matmul_4bit, 1 row", median_seconds(
            lambda: bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state), repeat)),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096, help="matrix side (default 4096)")
    parser.add_argument("--repeat", type=int, default=15, help="timed calls per row")
    parser.add_argument("--label", default="", help="free text stored with the results (e.g. before/after)")
    parser.add_argument("--output-dir", default=None, help="where the results JSON goes "
                        "(default: benchmarks/results)")
    args = parser.parse_args()
    side, repeat = args.side, args.repeat

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((side, side), np.float32)               # (side, side)
    elements = weight.size
    copy_input = median_seconds(lambda: np.copy(weight), repeat)
    print(machine_line())
    print(f"matrix {side}×{side} float32 ({weight.nbytes / 2**20:.0f} MiB); "
          f"median of {repeat} runs, each operation interleaved with its baseline in 5 rounds; "
          f"np.copy takes {copy_input * 1e3:.2f} ms\n")

    header = f"{'operation':34} {'ours ms':>9} {'baseline':>22} {'base ms':>9} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))

    table = []

    def row(name, seconds, baseline_name, baseline, target_text, passed):
        table.append({"operation": name, "ours_s": seconds, "baseline": baseline_name, "baseline_s": baseline,
                     "ratio": seconds / baseline, "target": target_text, "passed": passed})
        verdict = "" if passed is None else ("PASS" if passed else "MISS")
        print(f"{name:34} {seconds * 1e3:9.2f} {baseline_name:>22} {baseline * 1e3:9.2f} "
              f"{seconds / baseline:7.2f}  {target_text} {verdict}")

    for quant_type in ("nf4", "fp4", "int4", "int4_asym"):
        for double_quant in (False, True):
            name = f"quantize {quant_type}{' +dq' if double_quant else ''}"
            seconds, copy_input = interleaved_medians(
                [lambda: qlora_np.quantize(weight, quant_type, 64, double_quant), lambda: np.copy(weight)],
                repeat)
            rate = elements / seconds / 1e9
            is_target = quant_type == "nf4"
            row(name, seconds, "np.copy(input)", copy_input,
                f"{rate:.2f} G elem/s" + (" (≥ 2.3)" if is_target else ""),
                rate >= 2.3 if is_target else None)

    for quant_type in ("nf4", "fp4", "int4_asym"):
        for double_quant in (False, True):
            qt = qlora_np.quantize(weight, quant_type, 64, double_quant)
            output = qlora_np.dequantize(qt)
            seconds, copy_output = interleaved_medians([lambda: qlora_np.dequantize(qt),
                                                        lambda: np.copy(output)], repeat)
            row(f"dequantize {quant_type}{' +dq' if double_quant else ''}", seconds,
                "np.copy(output)", copy_output, "≤ 1.5× copy", seconds <= 1.5 * copy_output)

    for out_features, in_features in ((side, side), (side // 2, side * 2), (side * 2, side // 2)):
        dense_weight = rng.standard_normal((out_features, in_features), np.float32)
        qt = qlora_np.quantize(dense_weight, "nf4", 64, True)
        for rows in (1, 32):
            x = rng.standard_normal((rows, in_features), np.float32)       # (rows, in)
            g = rng.standard_normal((rows, out_features), np.float32)      # (rows, out)
            name = f"{out_features}×{in_features}, {rows} row{'s' if rows > 1 else ''}"
            dense, forward, int8, dense_t, backward = interleaved_medians(
                [lambda: x @ dense_weight.T, lambda: qlora_np.matmul(x, qt),
                 lambda: qlora_np.matmul(x, qt, int8_activations=True), lambda: g @ dense_weight,
                 lambda: qlora_np.matmul_t(g, qt)], repeat)
            target = (f"≥ 3× faster", forward * 3 <= dense) if rows == 1 else ("≤ 0.8×", forward <= 0.8 * dense)
            row(f"matmul {name}", forward, "numpy x @ W.T (fp32)", dense, *target)
            row(f"matmul int8 x, {name}", int8, "numpy x @ W.T (fp32)", dense,
                "(approximate, as llama.cpp)", None)
            row(f"matmul_t {name}", backward, "numpy g @ W (fp32)", dense_t,
                f"{backward / forward:.2f}× matmul (≤ 1.5)", backward <= 1.5 * forward)

    qt = qlora_np.quantize(weight, "nf4", 64, True)
    x = rng.standard_normal((1024, side), np.float32)                       # a training batch
    g = rng.standard_normal((1024, side), np.float32)
    dense, exact, rounded, dense_t, rounded_t = interleaved_medians(
        [lambda: x @ weight.T, lambda: qlora_np.matmul(x, qt),
         lambda: qlora_np.matmul(x, qt, compute_dtype="bfloat16"), lambda: g @ weight,
         lambda: qlora_np.matmul_t(g, qt, compute_dtype="bfloat16")], max(5, repeat // 3))
    row(f"matmul {side}×{side}, 1024 rows", exact, "numpy x @ W.T (fp32)", dense, "(decoded tiles + BLAS)", None)
    tiles = bfloat16_tiles()
    row(f"matmul, 1024 rows, bfloat16 ({tiles})", rounded, "numpy x @ W.T (fp32)", dense,
        f"{exact / rounded:.2f}× faster than float32", None)
    row(f"matmul_t, 1024 rows, bfloat16 ({tiles})", rounded_t, "numpy g @ W (fp32)", dense_t, "", None)

    for name, seconds in bitsandbytes_rows(weight, repeat):
        row(name, seconds, "np.copy(input)", copy_input, "", None)
    path = write_results("compare", {"side": side, "repeat": repeat}, table, numba.get_num_threads(),
                         os.path.dirname(os.path.dirname(os.path.abspath(qlora_np.__file__))), args.label,
                         args.output_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
