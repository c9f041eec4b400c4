"""Whole Llama checkpoints in the Hugging Face layout, read and written without torch: 4-bit in
bitsandbytes' layout (both ways), and plain float with the adapters merged in (written).

A folder holds ``config.json`` (the HF Llama config with a ``quantization_config``) and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``). Every
4-bit linear weight is stored as bitsandbytes' ``Linear4bit`` state dict under its HF
name — ``model.layers.N.self_attn.q_proj.weight`` (packed codes), ``.weight.absmax``,
``.weight.quant_map``, with double quant ``.weight.nested_absmax`` and
``.weight.nested_quant_map``, and ``.weight.quant_state.bitsandbytes__nf4`` (JSON) —
while the embedding, the norms and ``lm_head`` stay float.

HF orders the rows of q and k for rotate-half RoPE, this model for adjacent pairs, so
their rows are permuted on the way in and out. When every row holds whole blocks
(in_features a multiple of the block size) that moves packed rows and block scales and
is exact; double-quantized scales are decoded to float32 for it, because their groups of
256 blocks do not survive the permutation. Otherwise q and k are decoded: on loading
they stay float32, on saving they are quantized again in HF order.
"""

import json
import os

import ml_dtypes
import numpy as np

from qlora_np.errors import UnknownFormatError, UnsupportedModelError
from qlora_np.io.merge import merged_weights
from qlora_np.io.safetensors import CHECKPOINT_FILE, atomic_write, save_safetensors
from qlora_np.models.llama.hf import bnb_model_parts, reordered_rows
from qlora_np.models.llama.model import LlamaModel
from qlora_np.models.llama.architectures import hf_architecture_keys
from qlora_np.models.llama.names import (HF_LINEAR_NAMES, LINEAR_NAMES, gguf_to_hf_name, rope_heads, to_hf_values,
                                         unpermute_rope_rows)
from qlora_np.quant.codec import dequantize, quantize
from qlora_np.quant.tensor import BNB_BLOCKSIZES, QuantizedTensor


def load_bnb_model(folder):
    """A :class:`LlamaModel` from a transformers + bitsandbytes checkpoint folder (or a float HF one):
    4-bit weights as stored, float ones as float32 (:func:`~qlora_np.models.llama.hf.bnb_model_parts`)."""
    return LlamaModel(**bnb_model_parts(folder))


def save_bnb_model(model, folder, quant_type="nf4", blocksize=64, double_quant=True):
    """Write ``model``'s base weights as a transformers + bitsandbytes 4-bit checkpoint folder.

    4-bit nf4/fp4 weights are written as they are; float weights (and int4 ones, which
    bitsandbytes cannot hold) are quantized with ``quant_type``, ``blocksize``,
    ``double_quant``. The tokenizer's files are written too when the model has one.
    Adapters are not part of it: save them with ``save_peft``. Returns the config written.
    """
    config = model.config
    tensors = {"model.embed_tokens.weight": model.embedding,
               "model.norm.weight": to_hf_values("output_norm.weight", model.output_norm, config)}
    if not model.tied_output:
        tensors["lm_head.weight"] = _float_weight(model.output.base)
    for index, block in enumerate(model.blocks):
        hf = f"model.layers.{index}."
        floats = {f"blk.{index}.{name}.weight": weight for name, weight in block.norms().items()}
        floats.update({f"blk.{index}.{name}.bias": block.linears[name].bias for name in config.biases})
        for name, values in floats.items():
            tensors[gguf_to_hf_name(name, config)[0]] = to_hf_values(name, values, config)
        for name in LINEAR_NAMES:
            weight = _hf_quantized(block.linears[name].base, rope_heads(config, name),
                                   (quant_type, blocksize, double_quant))
            tensors.update(weight.to_bnb(hf + HF_LINEAR_NAMES[name] + ".weight"))
    hf_config = hf_llama_config(config, model.tied_output,
                                quantization=bnb_quantization_config(quant_type, double_quant))
    _write_hf_folder(folder, tensors, hf_config, model.tokenizer)
    return hf_config


MERGED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def save_merged_hf(model, folder, tensor_type="BF16"):
    """Write ``model`` with its adapters merged in as a plain Hugging Face checkpoint folder
    (what PEFT's ``merge_and_unload`` + ``save_pretrained`` give): every weight decoded to
    float32, W + scale·B@A where a layer has adapters, stored as ``tensor_type`` ("F32",
    "F16", "BF16"); config.json (no quantization) and the tokenizer's files. Returns the config."""
    if tensor_type not in MERGED_DTYPES:
        raise UnknownFormatError(f"a merged Hugging Face checkpoint holds {', '.join(MERGED_DTYPES)}, "
                                 f"got {tensor_type!r}")
    tensors = {}
    for name, _, make in merged_weights(model):
        tensors[gguf_to_hf_name(name, model.config)[0]] = to_hf_values(name, make(), model.config).astype(
            MERGED_DTYPES[tensor_type])
    hf_config = hf_llama_config(model.config, model.tied_output, np.dtype(MERGED_DTYPES[tensor_type]).name)
    _write_hf_folder(folder, tensors, hf_config, model.tokenizer)
    return hf_config


def _write_hf_folder(folder, tensors, hf_config, tokenizer):
    """model.safetensors, config.json and (when there is a tokenizer) its files, each written atomically."""
    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, CHECKPOINT_FILE), tensors, metadata={"format": "pt"})
    with atomic_write(os.path.join(folder, "config.json"), "w") as stream:
        json.dump(hf_config, stream, indent=2)
    if tokenizer is not None:
        tokenizer.save_hf(folder)


def hf_llama_config(config, tied_output, dtype="float32", quantization=None):
    """The config.json of a Hugging Face checkpoint of this shape and architecture, ``quantization``
    (:func:`bnb_quantization_config`) as its quantization_config when given. Llama 3.x's RoPE
    scaling goes in as ``rope_scaling``; frequency factors without its parameters (from a
    GGUF) raise UnsupportedModelError."""
    hf_config = {"dtype": dtype,
                 "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                 "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
                 "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
                 "intermediate_size": config.intermediate_size,
                 "rms_norm_eps": config.rms_norm_eps, "max_position_embeddings": config.context_length,
                 "rope_theta": config.rope_theta,
                 "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
                 "tie_word_embeddings": tied_output, "pad_token_id": None,    # the class defaults' may
                 **hf_architecture_keys(config)}                              # lie past the vocabulary
    if config.rope_scaling:                               # Llama 3.x, as transformers 4 and 5 read it
        hf_config["rope_scaling"] = {"rope_type": "llama3", **dict(config.rope_scaling)}
        hf_config["rope_parameters"].update(hf_config["rope_scaling"])
    elif config.rope_freq_factors:
        raise UnsupportedModelError("a Hugging Face config.json cannot hold RoPE frequency factors without "
                                    "the llama3 scaling parameters they came from (a GGUF's rope_freqs.weight)")
    if quantization is not None:
        hf_config["quantization_config"] = quantization
    return hf_config


def bnb_quantization_config(quant_type, double_quant):
    """config.json's ``quantization_config`` for bitsandbytes 4-bit weights (float32 compute)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}


# ---------------------------------------------------------------------------
# Row order of q and k
# ---------------------------------------------------------------------------


def _hf_quantized(weight, heads, settings):
    """A bitsandbytes-writable QuantizedTensor of a layer's base weight, rows in HF order."""
    writable = isinstance(weight, QuantizedTensor) and weight.quant_type in ("nf4", "fp4") \
        and weight.blocksize in BNB_BLOCKSIZES
    if heads is not None:
        weight = reordered_rows(weight, lambda rows: unpermute_rope_rows(rows, heads))
    if writable and isinstance(weight, QuantizedTensor):
        return weight
    return quantize(_float_weight(weight), *settings)


def _float_weight(weight):
    if isinstance(weight, QuantizedTensor):
        return dequantize(weight, dtype="float32")
    return np.asarray(weight, np.float32)


# ---------------------------------------------------------------------------
# Reading helpers
# ---------------------------------------------------------------------------

