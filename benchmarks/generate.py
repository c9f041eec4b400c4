"""Greedy generation speed: qlora_np (NF4) against llama.cpp on the same GGUF, same threads.

    python benchmarks/generate.py [--model PATH] [--tokens 64] [--threads 2] [--repeat 3]

Prints prefill and decode tokens/s and peak RSS for qlora_np with NF4 weights (exact float
products, then int8 activations: ``LlamaModel.int8_activations``), then
(when llama-cpp-python is installed here or in ``--llama-python``) llama.cpp's on the same file with the same thread
count, run in a subprocess, and the ratios; each is the median of ``--repeat`` runs.
"""

import os

try:                                  # the process settings the CLI uses, before NumPy loads OpenBLAS
    from qlora_np import runtime
    runtime.configure()
except ImportError:                   # for comparing with a tree from before the redesign (no runtime)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

import qlora_np  # noqa: E402
from qlora_np.demo import shipped_smollm2_path  # noqa: E402
from results import write_results  # noqa: E402  (benchmarks/ is the script's folder)
try:
    from qlora_np.models.llama.model import KVCache, LlamaModel  # noqa: E402
except ImportError:                   # a tree from before the redesign
    from qlora_np.llama import KVCache, LlamaModel  # noqa: E402

PROMPT = ("<|im_start|>user\nWrite a short story about a robot who learns to paint, in three "
          "sentences.<|im_end|>\n<|im_start|>assistant\n")

LLAMA_CPP_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, prompt, tokens, threads, repeat = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
model = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
ids = model.tokenize(prompt.encode(), add_bos=True, special=True)
model.eval(ids[:4])
runs = []
for _ in range(repeat):
    model.reset()
    start = time.perf_counter(); model.eval(ids); prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        token = model.sample(temp=0.0)
        model.eval([token])
    runs.append({"prompt_tokens": len(ids), "prefill_s": prefill, "decode_s": time.perf_counter() - start})
print(json.dumps(runs))
"""


def load_qlora_np(path, threads):
    numba.set_num_threads(threads)
    model = LlamaModel.from_gguf(path, quant_type="nf4")
    model.forward(np.array(model.tokenizer.encode(PROMPT))[:4], KVCache(model.config, 8))   # warm up
    return model


def run_qlora_np(model, tokens, int8_activations):
    model.int8_activations = int8_activations
    ids = np.array(model.tokenizer.encode(PROMPT))
    model.forward(ids[:4], KVCache(model.config, 8))                # compile / warm up this mode
    cache = KVCache(model.config, len(ids) + tokens + 1)
    start = time.perf_counter()
    logits = model.forward(ids, cache, last_only=True)[0]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(logits))
        logits = model.forward(np.array([token]), cache, last_only=True)[0]
    decode = time.perf_counter() - start
    return {"prompt_tokens": len(ids), "prefill_s": prefill, "decode_s": decode}


def median_run(runs):
    """The run with the median decode time (a shared machine has bursts of slowness)."""
    return sorted(runs, key=lambda run: run["decode_s"])[len(runs) // 2]


def run_llama_cpp(path, tokens, threads, python, repeat):
    found = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    if found.returncode != 0:
        return None
    result = subprocess.run([python, "-c", LLAMA_CPP_SCRIPT, path, PROMPT, str(tokens), str(threads),
                             str(repeat)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        print("llama.cpp failed:", result.stderr[-500:])
        return None
    return median_run(json.loads(result.stdout.strip().splitlines()[-1]))


def report(name, result, tokens):
    prefill = result["prompt_tokens"] / result["prefill_s"]
    decode = tokens / result["decode_s"]
    print(f"{name:28} prefill {prefill:8.1f} tok/s   decode {decode:7.1f} tok/s")
    return decode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the median is reported")
    parser.add_argument("--label", default="", help="free text stored with the results (e.g. before/after)")
    parser.add_argument("--output-dir", default=None, help="where the results JSON goes (default: benchmarks/results)")
    parser.add_argument("--llama-python", default=sys.executable,
                        help="a Python with llama-cpp-python installed (default: this one)")
    args = parser.parse_args()
    path = args.model or shipped_smollm2_path()
    print(f"{os.path.basename(path)}, {args.tokens} greedy tokens, {args.threads} threads")
    model = load_qlora_np(path, args.threads)
    runs = {False: [], True: []}
    for _ in range(args.repeat):                        # interleaved, so a slow spell hits both modes
        for int8 in runs:
            runs[int8].append(run_qlora_np(model, args.tokens, int8))
    ours = {int8: report(f"qlora_np (NF4 + dq{', int8 x' if int8 else ''})", median_run(runs[int8]),
                         args.tokens) for int8 in runs}
    print(f"{'':28} peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    theirs = run_llama_cpp(path, args.tokens, args.threads, args.llama_python, args.repeat)
    results = {"qlora_np_nf4": median_run(runs[False]), "qlora_np_nf4_int8": median_run(runs[True]),
               "decode_tok_s": {"exact": ours[False], "int8": ours[True]},
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "llama_cpp": theirs}
    if theirs is None:
        print("llama.cpp: llama-cpp-python not installed, skipped")
    else:
        llama = report("llama.cpp (same GGUF)", theirs, args.tokens)
        results["decode_tok_s"]["llama_cpp"] = llama
        for int8, name in ((False, "exact float products"), (True, "int8 activations, as llama.cpp")):
            results[f"ratio_{'int8' if int8 else 'exact'}"] = ours[int8] / llama
            print(f"decode speed ratio qlora_np / llama.cpp, {name}: {ours[int8] / llama:.2f} (target ≥ 1.0)")
    path = write_results("generate", {"model": os.path.basename(path), "tokens": args.tokens,
                                      "repeat": args.repeat}, results, args.threads,
                         os.path.dirname(os.path.dirname(os.path.abspath(qlora_np.__file__))),
                         args.label, args.output_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     "results"))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
