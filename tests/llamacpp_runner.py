"""Run llama.cpp (llama-cpp-python) on GGUF files in a subprocess, for the tests and data generators.

A malformed GGUF can kill the process that loads it (SIGSEGV, SIGABRT), so llama.cpp
always runs in a child process. The Python that has ``llama_cpp`` (the wheel in
``../shared/wheels``) is ``$QLORA_NP_LLAMA_CPP_PYTHON`` if set, else this interpreter
if it imports ``llama_cpp``; live tests skip without one, and their recorded twins
(outputs saved by the generator scripts under tests/data) run everywhere.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ENVIRONMENT_VARIABLE = "QLORA_NP_LLAMA_CPP_PYTHON"

_CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama

job = json.loads(sys.argv[1])
options = dict(n_ctx=256, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)  # F32 KV cache
if job["lora"]:
    options.update(lora_path=job["lora"], lora_scale=job["lora_scale"])
model = Llama(model_path=job["model"], **options)
saved = {}
for index, ids in enumerate(job["prompts"]):
    model.reset()
    model.eval(ids)
    saved[f"logits_{index}"] = np.array(model.scores[:len(ids)], np.float32)       # (T, vocab)
    if job["generate"]:
        out = model.create_completion(ids, max_tokens=job["generate"], temperature=0.0)
        saved[f"text_{index}"] = np.array(out["choices"][0]["text"])
np.savez(job["out"], **saved)
"""


def llama_cpp_python():
    """The Python executable that can import llama_cpp, or None."""
    configured = os.environ.get(ENVIRONMENT_VARIABLE)
    if configured:
        return configured
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


def run_llama_cpp(model, prompts, lora=None, lora_scale=1.0, generate=0, timeout=300):
    """llama.cpp's logits (T, vocab) per prompt of token ids, and greedy continuations if ``generate``.

    Returns {"logits_<i>": array, "text_<i>": str}. Raises RuntimeError (with llama.cpp's
    stderr) when the child fails or crashes.
    """
    python = llama_cpp_python()
    if python is None:
        raise RuntimeError(f"no Python with llama_cpp: set {ENVIRONMENT_VARIABLE}")
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "out.npz"
        job = {"model": str(model), "lora": str(lora) if lora else None, "lora_scale": lora_scale,
               "prompts": [[int(i) for i in ids] for ids in prompts], "generate": generate, "out": str(out)}
        result = subprocess.run([python, "-c", _CHILD, json.dumps(job)], capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"llama.cpp child exited with {result.returncode}: {result.stderr[-2000:]}")
        with np.load(out) as data:
            return {key: data[key] if key.startswith("logits") else str(data[key]) for key in data.files}
