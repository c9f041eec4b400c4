"""Streaming quantization of whole checkpoints, and a size table of any checkpoint file.

``quantize_checkpoint`` reads a safetensors checkpoint (one file, or the shards of a
folder) or a GGUF file tensor by tensor from memory maps and writes one safetensors file
in the bitsandbytes layout (each linear weight as ``Linear4bit`` state-dict entries,
everything else as it was). Peak memory is bounded by the largest tensor, not the
model: its float32 copy (none when it is float32 already), its 4-bit output and a 1 MiB
copy buffer (measured with tracemalloc in the tests; a GGUF input adds gguf-py's decoding
temporaries of that one tensor). The memory-mapped inputs are pages the OS can drop.
Tensor data goes to a temporary file as it is made and is copied behind the header at
the end, because the header must list every size first.
"""

import json
import os
import shutil
import tempfile

import numpy as np

from qlora_np.io.bnb import bnb_quantization_config, hf_llama_config
from qlora_np.errors import CheckpointError, UnknownFormatError
from qlora_np.io.gguf import decode_tensor, field_value, open_gguf
from qlora_np.models.llama.config import LlamaConfig
from qlora_np.models.llama.names import gguf_to_hf_name, unpermute_rope_rows
from qlora_np.quant.codec import quantize
from qlora_np.io.safetensors import DTYPE_NAMES, HEADER_ALIGNMENT, atomic_write, read_json, read_safetensors
from qlora_np.models.tokenizer import Tokenizer

KEEP_FLOAT = {"embed_tokens", "lm_head", "token_embd", "output"}
"""Name parts of weights that stay float, as transformers + bitsandbytes keep them: embeddings and
the LM head (``output.weight`` in GGUF; ``attn_output`` is a linear layer)."""
COPY_CHUNK = 2 ** 20


def source_tensors(path):
    """(name, loader) for every tensor of a GGUF file, a .safetensors file, or a folder of shards.

    ``loader()`` returns the tensor as an array: safetensors tensors as stored
    (memory-mapped), GGUF ones decoded to float32 (quantized GGUF types have no
    safetensors dtype).
    """
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files")
        tensors = {}
        for name in files:
            tensors.update(read_safetensors(os.path.join(path, name)))
        return [(name, _constant(array)) for name, array in tensors.items()]
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if str(path).endswith(".gguf"):
        return [(t.name, lambda t=t: decode_tensor(t)) for t in open_gguf(path).tensors]
    return [(name, _constant(array)) for name, array in read_safetensors(path).items()]


def _constant(array):
    return lambda: array


def quantize_checkpoint(source, target, quant_type="nf4", blocksize=64, double_quant=True, progress=False):
    """Quantize every 2-D float weight of ``source`` (except embeddings and LM head) into ``target``.

    ``target`` is a .safetensors file, or a folder that gets ``model.safetensors`` and,
    when ``source`` is a folder with an HF ``config.json``, that config with a
    bitsandbytes ``quantization_config`` (so :func:`qlora_np.io.bnb.load_bnb_model` and
    transformers read it). A Llama GGUF into a folder becomes that same kind of folder:
    Hugging Face names, q and k rows in HF order, a config.json and the tokenizer's files.
    Into a .safetensors file, and for other GGUFs, tensors keep their names.
    Returns a summary: tensors, quantized, bytes in and out.
    """
    if quant_type not in ("nf4", "fp4"):
        raise UnknownFormatError(f"bitsandbytes checkpoints hold nf4 or fp4, got {quant_type!r}")
    tensors = source_tensors(source)
    folder = None if str(target).endswith(".safetensors") else target
    llama = _llama_gguf(source) if folder else None
    if llama:
        tensors = [_hf_named(name, load, llama[0]) for name, load in tensors]
    out_path = os.path.join(folder, "model.safetensors") if folder else target
    if folder:
        os.makedirs(folder, exist_ok=True)
    bar = _progress_bar(len(tensors)) if progress else None
    header, offset, summary = {}, 0, {"tensors": 0, "quantized": 0, "bytes_in": 0, "bytes_out": 0}
    with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(out_path))) as data:
        for name, load in tensors:
            array = load()
            summary["tensors"] += 1
            summary["bytes_in"] += array.nbytes
            if _is_linear_weight(name, array):
                entries = quantize(array, quant_type, blocksize, double_quant).to_bnb(name)
                summary["quantized"] += 1
            else:
                entries = {name: array}
            for key, value in entries.items():
                value = np.ascontiguousarray(value, np.dtype(value.dtype).newbyteorder("<"))
                header[key] = {"dtype": DTYPE_NAMES[value.dtype], "shape": list(value.shape),
                               "data_offsets": [offset, offset + value.nbytes]}
                data.write(value.tobytes())
                offset += value.nbytes
            del array, entries
            if bar:
                bar.update(1)
        summary["bytes_out"] = offset
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
        data.seek(0)
        with atomic_write(out_path) as stream:
            stream.write(len(encoded).to_bytes(8, "little"))
            stream.write(encoded)
            shutil.copyfileobj(data, stream, COPY_CHUNK)
    if bar:
        bar.close()
    if folder and os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")):
        _write_quantized_config(os.path.join(source, "config.json"), folder, quant_type, double_quant)
    if llama:
        config, tokenizer = llama
        tied = "lm_head.weight" not in header
        quantization = bnb_quantization_config(quant_type, double_quant)
        with atomic_write(os.path.join(folder, "config.json"), "w") as stream:
            json.dump(hf_llama_config(config, tied, quantization=quantization), stream, indent=2)
        if tokenizer is not None:
            tokenizer.save_hf(folder)
    return summary


def _llama_gguf(source):
    """(LlamaConfig, Tokenizer or None) when ``source`` is a Llama GGUF file, else None."""
    if not (os.path.isfile(source) and str(source).endswith(".gguf")):
        return None
    reader = open_gguf(source)
    if field_value(reader, "general.architecture") != "llama":
        return None
    tokenizer = Tokenizer.from_gguf(reader) if "tokenizer.ggml.tokens" in reader.fields else None
    return LlamaConfig.from_gguf(reader, source), tokenizer


def _hf_named(name, load, config):
    """(Hugging Face name, loader) of a Llama GGUF tensor: q and k rows back in rotate-half order."""
    hf_name, heads = gguf_to_hf_name(name, config)
    return hf_name, (load if heads is None else lambda: unpermute_rope_rows(load(), heads))


def _is_linear_weight(name, array):
    float_dtype = array.dtype.kind == "f" or str(array.dtype) == "bfloat16"
    return array.ndim == 2 and float_dtype and name.endswith(".weight") and \
        not KEEP_FLOAT & set(name.split("."))


def _progress_bar(total):
    from tqdm import tqdm

    return tqdm(total=total, unit="tensor", desc="quantize")


def _write_quantized_config(source_config, folder, quant_type, double_quant):
    config = read_json(source_config)
    if not isinstance(config, dict):
        raise CheckpointError(f"{source_config}: must hold a JSON object")
    config["quantization_config"] = bnb_quantization_config(quant_type, double_quant)
    with atomic_write(os.path.join(folder, "config.json"), "w") as stream:
        json.dump(config, stream, indent=2)


# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------

def describe(path):
    """One row per tensor of a GGUF or safetensors file (or folder): name, type, shape, bytes, elements.

    bitsandbytes 4-bit weights are one row (their state-dict entries summed), with the
    shape from their quant-state JSON.
    """
    if os.path.isfile(path) and str(path).endswith(".gguf"):
        return [(t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), int(t.n_bytes),
                 int(t.n_elements)) for t in open_gguf(path).tensors]
    arrays = dict((name, load()) for name, load in source_tensors(path))
    quant_states = {key.split(".quant_state.bitsandbytes__")[0]: key for key in arrays
                    if ".quant_state.bitsandbytes__" in key}
    rows, grouped = [], set()
    for prefix, key in quant_states.items():
        parts = [k for k in arrays if k == prefix or k.startswith(prefix + ".")]
        grouped.update(parts)
        try:
            shape = tuple(json.loads(bytes(arrays[key]).decode("utf-8"))["shape"])
            elements = int(np.prod(shape, dtype=object))
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path}: {key} is not a readable quant state") from None
        rows.append((prefix, key.rsplit("__", 1)[1] + " (bnb)", shape, sum(arrays[k].nbytes for k in parts),
                     elements))
    for name, array in arrays.items():
        if name not in grouped:
            rows.append((name, str(array.dtype), tuple(array.shape), array.nbytes, array.size))
    return sorted(rows)


def format_info(rows):
    """Per-tensor table, then a memory table: bytes and bits per value for each type, and the total."""
    lines = [f"{'tensor':<52}{'type':>12}{'shape':>18}{'bytes':>14}"]
    for name, kind, shape, nbytes, _ in rows:
        lines.append(f"{name:<52}{kind:>12}{'×'.join(map(str, shape)):>18}{nbytes:>14,}")
    totals = {}
    for _, kind, _, nbytes, elements in rows:
        count, size, values = totals.get(kind, (0, 0, 0))
        totals[kind] = (count + 1, size + nbytes, values + elements)
    lines += ["", f"{'type':<16}{'tensors':>8}{'values':>16}{'MB':>12}{'bits/value':>12}"]
    all_values = all_bytes = 0
    for kind, (count, size, values) in sorted(totals.items()):
        lines.append(f"{kind:<16}{count:>8}{values:>16,}{size / 1e6:>12.2f}"
                     f"{8 * size / max(values, 1):>12.3f}")
        all_values, all_bytes = all_values + values, all_bytes + size
    lines.append(f"{'total':<16}{len(rows):>8}{all_values:>16,}{all_bytes / 1e6:>12.2f}"
                 f"{8 * all_bytes / max(all_values, 1):>12.3f}")
    lines.append(f"as float32: {4 * all_values / 1e6:.2f} MB, as float16: {2 * all_values / 1e6:.2f} MB")
    return "\n".join(lines)
