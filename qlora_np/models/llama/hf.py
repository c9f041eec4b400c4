"""Hugging Face Llama folders as the model reads them: bitsandbytes 4-bit weights kept as stored,
float ones as float32, q and k rows moved to GGUF order.

HF orders the rows of q and k for rotate-half RoPE, this model for adjacent pairs. When every
row holds whole blocks (in_features a multiple of the block size) moving rows moves packed rows
and block scales and is exact; double-quantized scales are decoded to float32 for it, because
their groups of 256 blocks do not survive the permutation. Otherwise q and k are decoded.
"""

import os

import numpy as np

from qlora_np.errors import CheckpointError, StateDictError
from qlora_np.io.safetensors import read_checkpoint_tensors, read_json
from qlora_np.models.llama.config import LlamaBlock, LlamaConfig
from qlora_np.models.llama.names import (HF_LINEAR_NAMES, LINEAR_NAMES, block_norm_names, from_hf_values,
                                         gguf_tensor_shapes, gguf_to_hf_name, hf_buffers, hf_tensor_names,
                                         permute_rope_rows, rope_heads)
from qlora_np.models.llama.support import check_tensors
from qlora_np.models.tokenizer import Tokenizer
from qlora_np.nn.lora import LoRALinear
from qlora_np.quant.backends import scales
from qlora_np.quant.codec import dequantize
from qlora_np.quant.tensor import QuantizedTensor


def is_bitsandbytes_folder(folder):
    """Whether the folder's config.json has a bitsandbytes ``quantization_config``."""
    path = os.path.join(folder, "config.json")
    hf = read_json(path) if os.path.isfile(path) else None
    quantization = hf.get("quantization_config") if isinstance(hf, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == "bitsandbytes"


def bnb_model_parts(folder):
    """The arguments of a :class:`~qlora_np.models.llama.model.LlamaModel` from a transformers +
    bitsandbytes checkpoint folder (or a float HF one), as a dict.

    4-bit weights load as they are stored (no decoding), float ones stay float32; the
    tokenizer comes from ``tokenizer.json`` when there is one. Anything missing, malformed or
    of the wrong shape raises CheckpointError; a tensor the model would not read (a bias, …)
    UnsupportedModelError.
    """
    config = LlamaConfig.from_hf_folder(folder)
    tensors = read_checkpoint_tensors(folder)
    tied = "lm_head.weight" not in tensors
    weights = {_weight_of(name) for name in tensors} - hf_buffers(tensors)
    check_tensors(weights, hf_tensor_names(config, tied), folder)
    shapes = gguf_tensor_shapes(config, tied)
    blocks = []
    for index in range(config.num_layers):
        hf, gguf = f"model.layers.{index}.", f"blk.{index}."
        linears = {}
        for name in LINEAR_NAMES:
            weight = linear_from_bnb(tensors, hf + HF_LINEAR_NAMES[name] + ".weight",
                                     shapes[gguf + name + ".weight"], folder)
            bias = _hf_float(tensors, gguf + name + ".bias", config, shapes, folder) \
                if name in config.biases else None
            linears[name] = gguf_layer(weight, rope_heads(config, name), bias)
        norms = {name: _hf_float(tensors, gguf + name + ".weight", config, shapes, folder)
                 for name in block_norm_names(config)}
        blocks.append(LlamaBlock(linears=linears, **norms))
    embedding = _float(tensors, "model.embed_tokens.weight", shapes["token_embd.weight"], folder)
    output = LoRALinear(embedding, mode="dense") if tied else gguf_layer(
        linear_from_bnb(tensors, "lm_head.weight", shapes["output.weight"], folder), None)
    return dict(config=config, embedding=embedding, blocks=blocks,
                output_norm=_hf_float(tensors, "output_norm.weight", config, shapes, folder),
                output=output, tokenizer=Tokenizer.from_hf_folder(folder), tied_output=tied)


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


def gguf_layer(weight, heads, bias=None):
    """A frozen layer of the model from an HF-ordered weight (QuantizedTensor or float32 array)
    and its bias (already in the model's order), if any."""
    if heads is not None:
        weight = reordered_rows(weight, lambda rows: permute_rope_rows(rows, heads))
    mode = "quant" if isinstance(weight, QuantizedTensor) else "dense"
    return LoRALinear(weight, bias, mode=mode)


def reordered_rows(weight, reorder):
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


def _weight_of(name):
    """The weight a state-dict entry belongs to: ``….weight`` for a 4-bit weight's
    ``….weight.absmax``, ``….weight.quant_state.…`` and the like, else the name itself."""
    head, quant_state, _ = name.partition(".weight.")
    return head + ".weight" if quant_state else name


def _hf_float(tensors, name, config, shapes, source):
    """The float tensor that GGUF name ``name`` has in the HF state dict, checked and in the
    model's order and norm convention."""
    return from_hf_values(name, _float(tensors, gguf_to_hf_name(name, config)[0], shapes[name], source), config)


def _float(tensors, key, shape, source):
    if key not in tensors:
        raise CheckpointError(f"{source}: checkpoint has no tensor {key!r}")
    array = tensors[key]
    if tuple(array.shape) != tuple(shape) or not (array.dtype.kind == "f" or str(array.dtype) == "bfloat16"):
        raise CheckpointError(f"{source}: {key} must be a float tensor of shape {tuple(shape)}, "
                              f"got {array.dtype} {tuple(array.shape)}")
    return np.asarray(array, np.float32)
