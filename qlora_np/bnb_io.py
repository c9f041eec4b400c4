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

from .errors import CheckpointError, StateDictError, UnknownFormatError
from .gguf_export import merged_weights
from .llama import HF_LINEAR_NAMES, LINEAR_NAMES, LlamaBlock, LlamaConfig, LlamaModel, gguf_to_hf_name, \
    permute_rope_rows, rope_heads, unpermute_rope_rows
from .lora import LoRALinear
from .ops import dequantize, quantize, scales
from .safetensors_io import CHECKPOINT_FILE, atomic_write, read_checkpoint_tensors, save_safetensors
from .tensor import BNB_BLOCKSIZES, QuantizedTensor
from .tokenizer import Tokenizer



def save_bnb_model(model, folder, quant_type="nf4", blocksize=64, double_quant=True):
    """Write ``model``'s base weights as a transformers + bitsandbytes 4-bit checkpoint folder.

    4-bit nf4/fp4 weights are written as they are; float weights (and int4 ones, which
    bitsandbytes cannot hold) are quantized with ``quant_type``, ``blocksize``,
    ``double_quant``. The tokenizer's files are written too when the model has one.
    Adapters are not part of it: save them with ``save_peft``. Returns the config written.
    """
    config = model.config
    tensors = {"model.embed_tokens.weight": model.embedding, "model.norm.weight": model.output_norm}
    if not model.tied_output:
        tensors["lm_head.weight"] = _float_weight(model.output.base)
    for index, block in enumerate(model.blocks):
        hf = f"model.layers.{index}."
        tensors[hf + "input_layernorm.weight"] = block.attn_norm
        tensors[hf + "post_attention_layernorm.weight"] = block.ffn_norm
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
        hf_name, heads = gguf_to_hf_name(name, model.config)
        values = make()
        tensors[hf_name] = (values if heads is None else unpermute_rope_rows(values, heads)).astype(
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
    """The config.json of a Hugging Face Llama checkpoint of this shape, ``quantization``
    (:func:`bnb_quantization_config`) as its quantization_config when given."""
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": dtype,
                 "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                 "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
                 "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
                 "intermediate_size": config.intermediate_size, "hidden_act": "silu",
                 "rms_norm_eps": config.rms_norm_eps, "max_position_embeddings": config.context_length,
                 "rope_theta": config.rope_theta,
                 "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
                 "tie_word_embeddings": tied_output, "attention_bias": False, "mlp_bias": False}
    if quantization is not None:
        hf_config["quantization_config"] = quantization
    return hf_config


def bnb_quantization_config(quant_type, double_quant):
    """config.json's ``quantization_config`` for bitsandbytes 4-bit weights (float32 compute)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}


def load_bnb_model(folder):
    """A :class:`LlamaModel` from a transformers + bitsandbytes checkpoint folder (or a float HF one).

    4-bit weights load as they are stored (no decoding), float ones stay float32; the
    tokenizer comes from ``tokenizer.json`` when there is one. Anything missing, malformed or
    of the wrong shape raises CheckpointError.
    """
    config = LlamaConfig.from_hf_folder(folder)
    tensors = read_checkpoint_tensors(folder)
    h, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    shapes = {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
              "ffn_gate": (config.intermediate_size, h), "ffn_up": (config.intermediate_size, h),
              "ffn_down": (h, config.intermediate_size)}
    blocks = []
    for index in range(config.num_layers):
        hf = f"model.layers.{index}."
        linears = {}
        for name in LINEAR_NAMES:
            weight = linear_from_bnb(tensors, hf + HF_LINEAR_NAMES[name] + ".weight", shapes[name], folder)
            linears[name] = _gguf_layer(weight, rope_heads(config, name))
        norms = [_float(tensors, hf + key, (h,), folder)
                 for key in ("input_layernorm.weight", "post_attention_layernorm.weight")]
        blocks.append(LlamaBlock(*norms, linears))
    embedding = _float(tensors, "model.embed_tokens.weight", (config.vocab_size, h), folder)
    tied = "lm_head.weight" not in tensors
    output = LoRALinear(embedding, mode="dense") if tied else _gguf_layer(
        linear_from_bnb(tensors, "lm_head.weight", (config.vocab_size, h), folder), None)
    return LlamaModel(config, embedding, blocks, _float(tensors, "model.norm.weight", (h,), folder), output,
                      tokenizer=Tokenizer.from_hf_folder(folder), tied_output=tied)


def linear_from_bnb(tensors, key, shape, source=""):
    """The weight ``key`` of a state dict: a QuantizedTensor if stored as a bitsandbytes 4-bit
    ``Linear4bit`` (keys ``key``, ``key.absmax``, … ``key.quant_state.bitsandbytes__<type>``),
    else a float32 array; ``shape`` (out, in) is checked."""
    if not any(k.startswith(key + ".quant_state.bitsandbytes__") for k in tensors):
        return _float(tensors, key, shape, source)
    state = {k: v for k, v in tensors.items() if k == key or k.startswith(key + ".")}
    try:
        weight = QuantizedTensor.from_bnb(state, key)
    except StateDictError as error:
        raise CheckpointError(f"{source}: {error}") from None
    if weight.shape != tuple(shape):
        raise CheckpointError(f"{source}: {key} holds a {weight.shape} weight, "
                              f"the config needs {tuple(shape)}")
    return weight


# ---------------------------------------------------------------------------
# Row order of q and k
# ---------------------------------------------------------------------------

def _gguf_layer(weight, heads):
    """A frozen layer of the model from an HF-ordered weight (QuantizedTensor or float32 array)."""
    if heads is not None:
        weight = _reordered_rows(weight, lambda rows: permute_rope_rows(rows, heads))
    mode = "quant" if isinstance(weight, QuantizedTensor) else "dense"
    return LoRALinear(weight, mode=mode)


def _hf_quantized(weight, heads, settings):
    """A bitsandbytes-writable QuantizedTensor of a layer's base weight, rows in HF order."""
    writable = isinstance(weight, QuantizedTensor) and weight.quant_type in ("nf4", "fp4") \
        and weight.blocksize in BNB_BLOCKSIZES
    if heads is not None:
        weight = _reordered_rows(weight, lambda rows: unpermute_rope_rows(rows, heads))
    if writable and isinstance(weight, QuantizedTensor):
        return weight
    return quantize(_float_weight(weight), *settings)


def _reordered_rows(weight, reorder):
    """``weight`` with rows reordered by ``reorder`` (a function of an (out, …) array).

    A 4-bit weight whose rows hold whole blocks keeps its codes: packed rows and block
    scales move together (scales as float32). Any other 4-bit weight is decoded.
    """
    if not isinstance(weight, QuantizedTensor):
        return reorder(np.asarray(weight, np.float32))
    out, inp = weight.shape
    if inp % weight.blocksize or weight.zero_point is not None:
        return reorder(dequantize(weight, dtype="float32"))
    packed = reorder(weight.packed.reshape(out, inp // 2)).reshape(-1)                # (out·in/2,)
    block_scales = reorder(scales(weight).reshape(out, inp // weight.blocksize)).reshape(-1)
    return QuantizedTensor(packed, np.array(block_scales, np.float32), weight.shape, weight.dtype,
                           weight.quant_type, weight.blocksize, weight.codebook.copy())


def _float_weight(weight):
    if isinstance(weight, QuantizedTensor):
        return dequantize(weight, dtype="float32")
    return np.asarray(weight, np.float32)


# ---------------------------------------------------------------------------
# Reading helpers
# ---------------------------------------------------------------------------

def _float(tensors, key, shape, source):
    if key not in tensors:
        raise CheckpointError(f"{source}: checkpoint has no tensor {key!r}")
    array = tensors[key]
    if tuple(array.shape) != tuple(shape) or not (array.dtype.kind == "f" or str(array.dtype) == "bfloat16"):
        raise CheckpointError(f"{source}: {key} must be a float tensor of shape {tuple(shape)}, "
                              f"got {array.dtype} {tuple(array.shape)}")
    return np.asarray(array, np.float32)
