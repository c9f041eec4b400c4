"""One QLoRA training step of a 4096×4096 layer against the same step in plain float32 NumPy.

    python benchmarks/train_step_layer.py [--side 4096] [--tokens 1024] [--repeat 5]

Step = forward + backward (gradients of the rank-8 adapters and of x) + AdamW. The
QLoRA layer keeps W in NF4 with double quant (8.5 MiB instead of 64 MiB) and
computes x @ W.T and g @ W from the packed codes; the baseline holds W dense in
float32 and does the same math with NumPy. Both run in this one process, so the
ratio is what to compare across machines.
"""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")   # before NumPy: no BLAS thread hand-off stalls

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from qlora_np import LoRALinear  # noqa: E402
from qlora_np.optim import AdamW  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/ is the script's folder)


def dense_step(x, upstream, weight, lora_a, lora_b, scale, optimizer_state):
    """The same step with W dense: forward, backward, AdamW on (A, B); plain NumPy."""
    hidden = x @ lora_a.T                                         # (tokens, r)
    y = x @ weight.T + scale * (hidden @ lora_b.T)                # (tokens, out)
    grad_b = scale * (upstream.T @ hidden)
    grad_hidden = scale * (upstream @ lora_b)
    grad_a = grad_hidden.T @ x
    grad_x = upstream @ weight + grad_hidden @ lora_a
    optimizer_state[0].grad, optimizer_state[1].grad = grad_a, grad_b
    optimizer_state[2].step()
    return y, grad_x


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
    params = dense.parameters()
    dense_optimizer = AdamW(params, lr=1e-4)
    state = (params["lora_a"], params["lora_b"], dense_optimizer)

    def numpy_step():
        dense_step(x, upstream, weight, dense.lora_a, dense.lora_b, dense.scale, state)

    qlora = median_seconds(qlora_step, args.repeat)
    numpy_time = median_seconds(numpy_step, args.repeat)
    base_bytes = layer.base.nbytes
    print(f"{args.side}×{args.side} layer, {args.tokens} tokens, rank 8, median of {args.repeat}")
    print(f"  QLoRA (NF4 + dq, W {base_bytes / 2**20:.1f} MiB):   {qlora * 1e3:8.1f} ms")
    print(f"  float32 NumPy (W {weight.nbytes / 2**20:.1f} MiB): {numpy_time * 1e3:8.1f} ms")
    print(f"  ratio QLoRA / float32: {qlora / numpy_time:.2f}")


if __name__ == "__main__":
    main()
