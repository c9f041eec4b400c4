"""GPU timings of the numba.cuda kernels on one weight (default 4096 × 4096); needs a real CUDA GPU.

    python benchmarks/bench_cuda.py [--side 4096] [--repeat 21]

First checks the GPU's bytes against the CPU kernels, then prints median times with the
data already on the GPU (every call is followed by ``cuda.synchronize()``): quantize
(nf4, and with double quant), dequantize, and ``matmul`` / ``matmul_t`` for 1 and 32 rows.
Baselines from the same run: a device-to-device copy of the float32 weight (memory
bandwidth) for quantize/dequantize, and our dense float32 tiled ``gemm`` on the decoded
weight for the products (numba-cuda has no cuBLAS). Under the CUDA simulator it refuses
to run: simulated times mean nothing.
"""

import argparse
import os
import sys
import time

import numpy as np

import qlora_np


def gpu_median_seconds(function, repeat):
    """Median wall time of ``repeat`` synchronised calls after two warm-up calls (JIT, caches)."""
    from numba import cuda
    for _ in range(2):
        function()
    cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.exit("bench_cuda.py: the CUDA simulator is on; its times mean nothing")
    from numba import cuda
    if not cuda.is_available():
        sys.exit("bench_cuda.py: no CUDA GPU here (numba.cuda.is_available() is False)")
    from qlora_np.kernels.cuda import kernels as gpu

    side, repeat = args.side, args.repeat
    weight = np.random.default_rng(0).standard_normal((side, side)).astype(np.float32)
    weight_gpu = cuda.to_device(weight)
    copy_target = cuda.device_array_like(weight_gpu)

    # 1. the GPU's bytes equal the CPU's before anything is timed
    on_cpu = qlora_np.quantize(weight, "nf4", 64, double_quant=True)
    on_gpu = qlora_np.quantize(weight_gpu, "nf4", 64, double_quant=True)
    for field in ("packed", "absmax", "nested_absmax"):
        if gpu.to_host(getattr(on_gpu, field)).tobytes() != getattr(on_cpu, field).tobytes():
            sys.exit(f"bench_cuda.py: GPU {field} differs from the CPU kernels'")
    decoded_gpu = qlora_np.dequantize(on_gpu)

    name = cuda.get_current_device().name
    print(f"{name.decode() if isinstance(name, bytes) else name}, numba.cuda {cuda.implementation}, "
          f"{side} × {side} float32, blocksize 64, median of {repeat}")
    copy = gpu_median_seconds(lambda: copy_target.copy_to_device(weight_gpu), repeat)
    rows = [("device-to-device copy of W (baseline)", copy, None)]
    rows.append(("quantize nf4", gpu_median_seconds(
        lambda: qlora_np.quantize(weight_gpu, "nf4", 64), repeat), copy))
    rows.append(("quantize nf4 + double quant", gpu_median_seconds(
        lambda: qlora_np.quantize(weight_gpu, "nf4", 64, double_quant=True), repeat), copy))
    rows.append(("dequantize nf4 + dq", gpu_median_seconds(
        lambda: qlora_np.dequantize(on_gpu), repeat), copy))
    for batch in (1, 32):
        x = cuda.to_device(np.ones((batch, side), np.float32))
        dense = gpu_median_seconds(lambda: gpu.gemm(x, decoded_gpu, transpose_b=True), repeat)
        rows.append((f"dense fp32 gemm x @ W.T, {batch} rows (baseline)", dense, None))
        rows.append((f"matmul nf4 + dq, {batch} rows", gpu_median_seconds(
            lambda: qlora_np.matmul(x, on_gpu), repeat), dense))
        rows.append((f"matmul_t nf4 + dq, {batch} rows", gpu_median_seconds(
            lambda: qlora_np.matmul_t(x, on_gpu), repeat), dense))
    for name, seconds, baseline in rows:
        ratio = "" if baseline is None else f"  ratio {seconds / baseline:.2f}"
        print(f"{name:<48} {seconds * 1e3:9.3f} ms{ratio}")


if __name__ == "__main__":
    main()
