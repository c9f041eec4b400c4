"""Training speed and memory: a QLoRA step on SmolLM2-135M, qlora_np against plain PyTorch.

    python benchmarks/train_step.py [--steps 5] [--batch 4] [--seq 256] [--threads 2]
                                    [--compute-dtype both] [--rounds 1] [--torch-python PATH]
                                    [--label TEXT] [--output-dir DIR]

One step = forward, backward and AdamW for LoRA r=8 (alpha 16) on q, k, v, o, gate,
up and down of every block, on ``batch`` rows of ``seq`` random tokens, all tokens
labelled. Each side runs in its own subprocess, so each peak RSS is its own:

* qlora_np: the GGUF re-quantized to NF4 with double quant (the QLoRA set-up), once
  with float32 products and once with ``compute_dtype="bfloat16"``;
* PyTorch (when ``--torch-python`` has torch): the same model written directly in
  torch (no transformers), the same GGUF weights decoded to frozen float32, LoRA
  adapters as trainable tensors, autograd, ``torch.optim.AdamW``; with bitsandbytes
  installed there, its frozen linear weights are bnb NF4 ``Linear4bit`` layers. It runs
  in float32, and in bfloat16 the way QLoRA recipes set it up (``bnb_4bit_compute_dtype=
  bfloat16`` and bf16 mixed precision, i.e. ``torch.autocast``).

Prints tokens/s (the median of the steps after the first two, which warm up caches and
allocators) and peak RSS for each, the arithmetic a step needs and the rate each side
reached, and the ratios of like to like (targets: ≥ 2× their tokens/s at ≤ 0.5× their
peak RSS). Each ratio compares two runs made one after the other; ``--rounds`` repeats
the pairs and reports the median ratio (a shared machine's speed drifts over minutes).
Every step time, peak RSS and ratio goes to a machine-stamped JSON file under
benchmarks/results/ (benchmarks/results.py).
"""

import os

THEIR_ENVIRONMENT = dict(os.environ)     # torch runs as the user's environment has it, without our settings

CONFIGURE = """
try:                                  # the process settings the CLI uses, before NumPy loads OpenBLAS
    from qlora_np import runtime
    runtime.configure()
except ImportError:                   # for comparing with a tree from before the redesign (no runtime)
    import os
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
"""
exec(CONFIGURE)                       # here too: the qlora_np child inherits the two variables

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from results import write_results  # noqa: E402  (benchmarks/ is the script's folder)

OURS = CONFIGURE + r"""
import json, resource, sys, time
import numba, numpy as np
try:
    from qlora_np.models.llama.model import LlamaModel
    from qlora_np.models.llama.lora import inject_lora, loss_and_backward
    from qlora_np.nn.optim import AdamW
except ImportError:                   # for comparing with a tree from before the redesign
    from qlora_np.llama import LlamaModel
    from qlora_np.llama_lora import inject_lora, loss_and_backward
    from qlora_np.optim import AdamW
path, steps, batch, seq, threads = sys.argv[1], *map(int, sys.argv[2:6])
numba.set_num_threads(threads)
model = LlamaModel.from_gguf(path, quant_type="nf4")
params = inject_lora(model, "all-linear", r=8, alpha=16)
model.set_compute_dtype(sys.argv[6])
optimizer = AdamW(params, lr=1e-4)
rng = np.random.default_rng(0)
ids = rng.integers(0, model.config.vocab_size, (batch, seq))
labels = rng.integers(0, model.config.vocab_size, (batch, seq))
times, losses = [], []
for _ in range(steps):
    start = time.perf_counter()
    losses.append(loss_and_backward(model, ids, labels))
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
print(json.dumps({"times": times, "losses": losses,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TORCH = r"""
import json, resource, sys, time
import gguf, numpy as np, torch
from gguf.quants import dequantize
path, steps, batch, seq, threads = sys.argv[1], *map(int, sys.argv[2:6])
compute_dtype = getattr(torch, sys.argv[6])
torch.set_num_threads(threads)
torch.manual_seed(0)
reader = gguf.GGUFReader(path)
def field(key):
    f = reader.fields[key]
    return f.parts[f.data[0]][0].item()
hidden, layers = field("llama.embedding_length"), field("llama.block_count")
heads, kv_heads = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
eps, theta = field("llama.attention.layer_norm_rms_epsilon"), field("llama.rope.freq_base")
head_dim = hidden // heads
weights = {}
for t in reader.tensors:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    weights[t.name] = torch.from_numpy(np.ascontiguousarray(
        dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)))
try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

class LoRA(torch.nn.Module):
    def __init__(self, weight, r=8, alpha=16):
        super().__init__()
        out_f, in_f = weight.shape
        if bnb is not None:
            self.base = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type="nf4",
                                          compress_statistics=True, compute_dtype=compute_dtype)
            self.base.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            self.base = self.base.to("cpu")          # moving to a device quantizes the weight
        else:
            self.base = torch.nn.Linear(in_f, out_f, bias=False)
            self.base.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.a = torch.nn.Parameter(torch.empty(r, in_f).uniform_(-in_f ** -0.5, in_f ** -0.5))
        self.b = torch.nn.Parameter(torch.zeros(out_f, r))
        self.scale = alpha / r
    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T

def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

def rope(x, cos, sin):                       # adjacent pairs, the GGUF row order
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)

blocks = [{name: LoRA(weights[f"blk.{i}.{name}.weight"]) for name in NAMES} for i in range(layers)]
params = [p for block in blocks for layer in block.values() for p in (layer.a, layer.b)]
optimizer = torch.optim.AdamW(params, lr=1e-4)
embedding = weights["token_embd.weight"]
angles = torch.arange(seq)[:, None] * theta ** (-torch.arange(0, head_dim, 2) / head_dim)
cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]

def loss_of(ids, labels):
    x = embedding[ids]
    for i, block in enumerate(blocks):
        n = rms(x, weights[f"blk.{i}.attn_norm.weight"])
        q = rope(block["attn_q"](n).view(batch, seq, heads, head_dim), cos, sin).transpose(1, 2)
        k = rope(block["attn_k"](n).view(batch, seq, kv_heads, head_dim), cos, sin).transpose(1, 2)
        v = block["attn_v"](n).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        k = k.repeat_interleave(heads // kv_heads, 1)
        v = v.repeat_interleave(heads // kv_heads, 1)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + block["attn_output"](o.transpose(1, 2).reshape(batch, seq, hidden))
        m = rms(x, weights[f"blk.{i}.ffn_norm.weight"])
        x = x + block["ffn_down"](torch.nn.functional.silu(block["ffn_gate"](m)) * block["ffn_up"](m))
    logits = rms(x, weights["output_norm.weight"]) @ embedding.T
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))

generator = np.random.default_rng(0)
ids = torch.from_numpy(generator.integers(0, embedding.shape[0], (batch, seq)))
labels = torch.from_numpy(generator.integers(0, embedding.shape[0], (batch, seq)))
times, losses = [], []
for _ in range(steps):
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16):
        loss = loss_of(ids, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
    losses.append(loss.item())
print(json.dumps({"times": times, "losses": losses, "bnb": bnb is not None, "torch": torch.__version__,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(python, script, args, env=None):
    """Run one side in a subprocess; its JSON result, or None (with the reason printed)."""
    result = subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True,
                            timeout=3600, env=env)
    if result.returncode != 0:
        print(f"  failed: {result.stderr.strip()[-800:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_flops(config, batch, seq, r=8):
    """The arithmetic one training step needs (multiply-adds count 2): the products with the
    frozen weights forward and back to their inputs (the LM head included), the adapters'
    products (forward, both gradients and the gradient to x), and causal attention (half
    the score square, forward and back). Element-wise work is left out."""
    h, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    kv = config.num_kv_heads * hd
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]   # (out, in)
    frozen = sum(o * i for o, i in shapes) * config.num_layers + config.vocab_size * h
    adapters = sum(r * (o + i) for o, i in shapes) * config.num_layers
    attention = config.num_layers * config.num_heads * hd * seq              # per token, forward: qk + pv
    per_token = 2 * (2 * frozen + 3 * adapters + 3 * attention)
    return per_token * batch * seq


def summary(name, result, tokens, flops):
    """Print one side's line; its tokens/s (the median of the steps after two warm-up steps)."""
    seconds = statistics.median(result["times"][2:] or result["times"][-1:])
    print(f"{name:40} {tokens / seconds:7.1f} tokens/s  {flops / seconds / 1e9:5.0f} GFLOP/s   "
          f"first step {result['times'][0]:5.2f} s   peak RSS {result['rss_mib']:6.0f} MiB   "
          f"loss {result['losses'][0]:.3f}")
    return tokens / seconds


def main():
    import qlora_np
    from qlora_np.demo import shipped_smollm2_path
    try:
        from qlora_np.io.gguf import open_gguf
        from qlora_np.models.llama.config import LlamaConfig
    except ImportError:               # for comparing with a tree from before the redesign
        from qlora_np.gguf_io import open_gguf
        from qlora_np.llama import LlamaConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute-dtype", default="both", choices=["float32", "bfloat16", "both"],
                        help="what both sides multiply in (default: a run with each)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat ours-then-theirs this many times and report the median ratio: each "
                             "ratio compares two runs made back to back, under the same machine noise")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="a Python with torch (and gguf) installed (default: this one)")
    parser.add_argument("--label", default="", help="free text stored with the results (e.g. before/after)")
    parser.add_argument("--output-dir", default=None, help="where the results JSON goes (default: benchmarks/results)")
    args = parser.parse_args()
    path = args.model or shipped_smollm2_path()
    tokens = args.batch * args.seq
    flops = step_flops(LlamaConfig.from_gguf(open_gguf(path)), args.batch, args.seq)
    dtypes = ("float32", "bfloat16") if args.compute_dtype == "both" else (args.compute_dtype,)
    common = [path, args.steps, args.batch, args.seq, args.threads]
    print(f"{os.path.basename(path)}: LoRA r=8 on all 7 linear layers, batch {args.batch} × seq {args.seq}"
          f" = {tokens} tokens a step ({flops / 1e9:.0f} GFLOP), {args.threads} threads, {args.steps} steps")
    has_torch = subprocess.run([args.torch_python, "-c", "import torch, gguf"],
                               capture_output=True).returncode == 0
    if not has_torch:
        print("PyTorch: torch and gguf are not installed in --torch-python, skipped")
    ratios = {compute_dtype: [] for compute_dtype in dtypes}
    runs = []                                               # one entry per side, dtype and round
    for round_index in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_index + 1} of {args.rounds}")
        for compute_dtype in dtypes:
            result = run(sys.executable, OURS, common + [compute_dtype])
            if result is None:
                return
            our_speed = summary(f"qlora_np (NF4 + dq, {compute_dtype})", result, tokens, flops)
            runs.append({"side": "qlora_np", "compute_dtype": compute_dtype, "round": round_index,
                         "tokens_per_s": our_speed, **result})
            if not has_torch:
                continue
            theirs = run(args.torch_python, TORCH, common + [compute_dtype], THEIR_ENVIRONMENT)
            if theirs is None:
                return
            frozen = "bnb NF4" if theirs["bnb"] else "fp32 frozen"
            label = f"torch {theirs['torch']} ({frozen}, {compute_dtype})"
            their_speed = summary(label, theirs, tokens, flops)
            runs.append({"side": "torch", "compute_dtype": compute_dtype, "round": round_index,
                         "tokens_per_s": their_speed, **theirs})
            ratios[compute_dtype].append((our_speed / their_speed, result["rss_mib"] / theirs["rss_mib"]))
            print(f"{compute_dtype}: qlora_np / torch speed {our_speed / their_speed:.2f} (target ≥ 2.0), "
                  f"peak RSS {result['rss_mib'] / theirs['rss_mib']:.2f} (target ≤ 0.5)")
    for compute_dtype, pairs in ratios.items():
        if len(pairs) > 1:
            speed = sorted(ratio for ratio, _ in pairs)
            memory = sorted(ratio for _, ratio in pairs)
            print(f"{compute_dtype} over {len(pairs)} rounds: speed ratio median "
                  f"{statistics.median(speed):.2f} ({speed[0]:.2f}–{speed[-1]:.2f}), "
                  f"peak RSS ratio median {statistics.median(memory):.2f}")
    results = {"tokens_per_step": tokens, "flops_per_step": flops, "runs": runs,
               "ratios": {compute_dtype: [{"speed": speed, "peak_rss": memory} for speed, memory in pairs]
                          for compute_dtype, pairs in ratios.items()}}
    arguments = {"model": os.path.basename(path), "steps": args.steps, "batch": args.batch, "seq": args.seq,
                 "compute_dtype": args.compute_dtype, "rounds": args.rounds}
    written = write_results("train_step", arguments, results, args.threads,
                            os.path.dirname(os.path.dirname(os.path.abspath(qlora_np.__file__))), args.label,
                            args.output_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    print(f"results: {written}")


if __name__ == "__main__":
    main()
