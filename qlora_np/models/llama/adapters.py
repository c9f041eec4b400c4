"""A model's LoRA adapters as plain arrays: list them, and attach loaded ones.

The adapter file formats (GGUF, PEFT) all hold the same thing per linear layer — A
(r, in), B (out, r) and a scale — so they share these two helpers. Inside the model B
is in the GGUF row order (q and k rows permuted for adjacent-pair RoPE).
"""

import numpy as np

from qlora_np.errors import InvalidValueError, ShapeError
from qlora_np.models.llama.names import permute_rope_rows, rope_heads
from qlora_np.nn.lora import LoRALinear
from qlora_np.quant.tensor import QuantizedTensor


def model_adapters(model):
    """Yield (layer index, GGUF name such as "attn_q", LoRALinear) for every layer with unmerged adapters."""
    for index, block in enumerate(model.blocks):
        for name, layer in block.linears.items():
            if layer.has_adapters:
                if layer.merged:
                    raise InvalidValueError(f"blk.{index}.{name} is merged: its adapters are inside W")
                yield index, name, layer


def attach_adapter(model, index, name, lora_a, lora_b, alpha, use_rslora=False, hf_rows=False):
    """Give layer ``name`` of block ``index`` the adapters A (r, in), B (out, r).

    B's rows are in the GGUF order, or with ``hf_rows`` in Hugging Face's rotate-half
    order (PEFT files), which is permuted here for q and k once the shapes are checked.
    """
    if not 0 <= index < len(model.blocks) or name not in model.blocks[index].linears:
        raise ShapeError(f"the model has no layer blk.{index}.{name}")
    layer = model.blocks[index].linears[name]
    if layer.has_adapters:
        raise InvalidValueError(f"blk.{index}.{name} already has adapters")
    lora_a, lora_b = np.asarray(lora_a, np.float32), np.asarray(lora_b, np.float32)
    expected_a, expected_b = (lora_a.shape[0], layer.in_features), (layer.out_features, lora_a.shape[0])
    if lora_a.ndim != 2 or lora_b.shape != expected_b or lora_a.shape != expected_a:
        raise ShapeError(f"blk.{index}.{name}: adapters must be A {expected_a} and B {expected_b}, "
                         f"got A {lora_a.shape} and B {lora_b.shape}")
    heads = rope_heads(model.config, name)
    if hf_rows and heads is not None:
        lora_b = permute_rope_rows(lora_b, heads)
    mode = "qlora" if isinstance(layer.base, QuantizedTensor) else "lora"
    adapted = LoRALinear(layer.base, layer.bias, lora_a, lora_b, alpha, mode=mode, use_rslora=use_rslora)
    adapted.training = layer.training
    model.blocks[index].linears[name] = adapted
