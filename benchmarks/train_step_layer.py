"""One QLoRA training step of a 4096×4096 layer against the same step in plain float32 NumPy.

    python benchmarks/train_step_layer.py [--side 4096] [--tokens 1024] [--repeat 5]

Step = forward + backward (gradients of the rank-8 adapters and of x) + AdamW. The
QLoRA layer keeps W in NF4 with double quant (8.3 MiB instead of 64 MiB) and
computes x @ W.T and g @ W from the packed codes; the baseline holds W dense in
float32 and does the same math with NumPy. Both run in this one process, so the
ratio is what to compare across machines. Peak extra memory is the step's highest
resident set size above the one it started from (Linux only).
"""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")   # before NumPy: no BLAS thread hand-off stalls

import argparse  # noqa: E402
import ctypes  # noqa: E402
import ctypes.util  # noqa: E402

import numpy as np  # noqa: E402

from qlora_np import LoRALinear  # noqa: E402
from qlora_np.nn.optim import AdamW  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/ is the script's folder)


def dense_step(x, upstream, weight, lora_a, lora_b, scale, params, optimizer):
    """The same step with W dense: forward, backward, AdamW on (A, B); plain NumPy."""
    hidden = x @ lora_a.T                                         # (tokens, r)
    y = x @ weight.T                                              # (tokens, out)
    y += (scale * hidden) @ lora_b.T
    grad_b = scale * (upstream.T @ hidden)                        # (out, r)
    grad_hidden = scale * (upstream @ lora_b)                     # (tokens, r)
    grad_a = grad_hidden.T @ x                                    # (r, in)
    grad_x = upstream @ weight                                    # (tokens, in)
    grad_x += grad_hidden @ lora_a
    params["lora_a"].grad, params["lora_b"].grad = grad_a, grad_b
    optimizer.step()
    optimizer.zero_grad()
    return y, grad_x


def peak_extra_bytes(function):
    """Highest resident memory during one call of ``function`` above the memory before it; None off Linux.

    Freed heap memory is handed back to the system first (glibc ``malloc_trim``), so
    re-used allocations count as new ones; the kernel's peak counter is reset through
    /proc/self/clear_refs.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")                                 # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        function()
        return (_status_kib("VmHWM") - before) * 1024
    except (OSError, AttributeError):
        return None


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _mib(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8 * 128, help="batch × sequence (default 8×128)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.side, args.side)) * 0.02).astype(np.float32)
    x = rng.standard_normal((args.tokens, args.side)).astype(np.float32)
    upstream = rng.standard_normal((args.tokens, args.side)).astype(np.float32)

    layer = LoRALinear.from_weight(weight, r=8, alpha=16, mode="qlora", seed=0)
    optimizer = AdamW(layer.parameters(), lr=1e-4)

    def qlora_step():
        layer.forward(x)
        layer.backward(upstream)
        optimizer.step()
        optimizer.zero_grad()

    dense = LoRALinear.from_weight(weight, r=8, alpha=16, mode="lora", seed=0)
    dense_params = dense.parameters()
    dense_optimizer = AdamW(dense_params, lr=1e-4)

    def numpy_step():
        dense_step(x, upstream, weight, dense.lora_a, dense.lora_b, dense.scale, dense_params, dense_optimizer)

    qlora = median_seconds(qlora_step, args.repeat)
    numpy_time = median_seconds(numpy_step, args.repeat)
    qlora_peak, numpy_peak = peak_extra_bytes(qlora_step), peak_extra_bytes(numpy_step)
    print(f"{args.side}×{args.side} layer, {args.tokens} tokens, rank 8, median of {args.repeat}")
    print(f"  QLoRA (NF4 + dq, W {_mib(layer.base.nbytes)}):   {qlora * 1e3:8.1f} ms,"
          f" peak extra memory {_mib(qlora_peak)}")
    print(f"  float32 NumPy (W {_mib(weight.nbytes)}): {numpy_time * 1e3:8.1f} ms,"
          f" peak extra memory {_mib(numpy_peak)}")
    print(f"  ratio QLoRA / float32: {qlora / numpy_time:.2f}")


if __name__ == "__main__":
    main()
