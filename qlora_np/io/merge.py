"""A model's weights with its adapters merged in, one tensor at a time: what every merged writer reads."""

import numpy as np

from qlora_np.models.llama.names import LINEAR_NAMES
from qlora_np.quant.codec import dequantize
from qlora_np.quant.tensor import QuantizedTensor


def merged_weights(model):
    """(GGUF name, shape, make) for every tensor of the model; ``make()`` gives the merged float32 values.

    Nothing is decoded or merged until ``make`` is called, so a writer holds one tensor at a time.
    """
    def linear(layer):
        def make():
            weight = layer.base
            weight = dequantize(weight, dtype="float32") if isinstance(weight, QuantizedTensor) \
                else np.asarray(weight, np.float32)
            if layer.has_adapters and not layer.merged:
                weight = weight + layer.delta_weight().astype(np.float32)
            return weight
        return make

    def array(values):
        return lambda: np.asarray(values, np.float32)

    yield "token_embd.weight", model.embedding.shape, array(model.embedding)
    for index, block in enumerate(model.blocks):
        prefix = f"blk.{index}."
        for name, weight in block.norms().items():
            yield prefix + name + ".weight", weight.shape, array(weight)
        for name in LINEAR_NAMES:
            layer = block.linears[name]
            yield prefix + name + ".weight", (layer.out_features, layer.in_features), linear(layer)
            if layer.bias is not None:
                yield prefix + name + ".bias", layer.bias.shape, array(layer.bias)
    yield "output_norm.weight", model.output_norm.shape, array(model.output_norm)
    if not model.tied_output:
        yield "output.weight", (model.output.out_features, model.output.in_features), linear(model.output)
