"""Training memory of full fine-tuning, LoRA and QLoRA, computed from a model's shape.

Counts the bytes that do not depend on batch size — weights, gradients, optimizer
state, quantization constants — for LLaMA-style models. Activations are left out
(they depend on batch, sequence length and checkpointing). Bytes per value:

* full fp32:        weight 4 + gradient 4 + AdamW moments 4 + 4                 = 16
* full fp16 mixed:  fp16 weight 2 + fp16 gradient 2 + fp32 master weight 4
                    + fp32 moments 8                                              = 16
                    (mixed precision as in ZeRO, Rajbhandari et al. 2020 §3.1: it
                    halves activations, not the optimizer's memory)
* LoRA:             frozen fp16 weight 2; each adapter value its own bytes below
* QLoRA:            frozen linear weights NF4 with double quant (blocksize 64,
                    nested blocksize 256): 4 + 8/64 + 32/(64·256) bits; embeddings,
                    LM head and norms stay 16-bit (as in QLoRA); adapters as LoRA.
* adapters:         fp32: value 4 + gradient 4 + moments 8 = 16;
                    bf16: value 2 + gradient 2 + fp32 moments 8 = 12.
"""

from dataclasses import dataclass

GIB = 1024 ** 3
MIB = 1024 ** 2

FULL_BYTES = {"full fp32": 4 + 4 + 8, "full fp16 mixed": 2 + 2 + 4 + 8}
"""Bytes per value of full fine-tuning with AdamW: weight, gradient, (master copy,) two moments."""

FROZEN_16BIT_BYTES = 2
"""A frozen fp16 / bf16 value."""

ADAPTER_BYTES = {"fp32": 4 + 4 + 8, "bf16": 2 + 2 + 8}
"""Bytes per adapter value: value + gradient (in the adapter dtype) + two fp32 AdamW moments."""

NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)
"""Bits per weight of NF4 with double quant: codes + 8-bit scales + a float32 per 256 scales."""

SETUPS = ("full fp32", "full fp16 mixed", "LoRA (fp16 base)", "QLoRA (NF4 base)")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that fix a LLaMA-style decoder's parameter count."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def linear_shapes(self):
        """(out, in) of the 7 linear layers of one decoder block: q, k, v, o, gate, up, down."""
        kv = self.hidden // self.heads * self.kv_heads
        h, f = self.hidden, self.intermediate
        return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]

    @property
    def linear_parameters(self):
        return self.layers * sum(out * inp for out, inp in self.linear_shapes)

    @property
    def other_parameters(self):
        """Embedding, untied LM head and RMSNorm weights (2 per block + the final one)."""
        return 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    @property
    def parameters(self):
        return self.linear_parameters + self.other_parameters

    def lora_parameters(self, r):
        """Adapter values for rank r on every linear layer of every block: r · (in + out) each."""
        return self.layers * sum(r * (out + inp) for out, inp in self.linear_shapes)


LLAMA_SHAPES = {
    "7B": ModelShape("LLaMA-2 7B", 4096, 32, 11008, 32, 32, 32000),
    "13B": ModelShape("LLaMA-2 13B", 5120, 40, 13824, 40, 40, 32000),
    "70B": ModelShape("LLaMA-2 70B", 8192, 80, 28672, 64, 8, 32000),   # grouped-query: 8 KV heads
}


def setup_bytes(linear_values, other_values, adapter_values, adapter_dtype="fp32"):
    """Bytes of each set-up in :data:`SETUPS`, as a dict of dicts of parts.

    ``linear_values`` are the weights QLoRA quantizes (and LoRA adapts),
    ``other_values`` the rest (embeddings, norms, biases), ``adapter_values`` the
    LoRA A and B values. Any model fits: a LLaMA shape or the example's MLP.
    """
    values = linear_values + other_values
    adapters = adapter_values * ADAPTER_BYTES[adapter_dtype]
    parts = {name: {"weights+grads+optimizer": per_value * values}
             for name, per_value in FULL_BYTES.items()}
    parts["LoRA (fp16 base)"] = {"frozen weights": FROZEN_16BIT_BYTES * values,
                                 "adapters+grads+optimizer": adapters}
    parts["QLoRA (NF4 base)"] = {"frozen weights": round(linear_values * NF4_DQ_BITS / 8)
                                 + FROZEN_16BIT_BYTES * other_values,
                                 "adapters+grads+optimizer": adapters}
    return parts


def training_bytes(shape, r=16, adapter_dtype="fp32"):
    """:func:`setup_bytes` for a :class:`ModelShape` with rank-r LoRA on all its linear layers."""
    return setup_bytes(shape.linear_parameters, shape.other_parameters, shape.lora_parameters(r),
                       adapter_dtype)


def setup_totals(parts, unit=GIB):
    """Each set-up's total in ``unit`` bytes, from :func:`setup_bytes` output."""
    return {name: sum(setup.values()) / unit for name, setup in parts.items()}


def format_scaling_table(r=16, adapter_dtype="fp32", shapes=None):
    """A text table: parameters and GiB per set-up for 7B / 13B / 70B (or ``shapes``)."""
    shapes = list(LLAMA_SHAPES.values()) if shapes is None else shapes
    header = f"{'model':14} {'params':>8} " + " ".join(f"{name:>17}" for name in SETUPS)
    lines = ["Training memory without activations (GiB): weights, gradients, AdamW state;",
             f"LoRA rank {r} on all 7 linear layers of every block, {adapter_dtype} adapters",
             header, "-" * len(header)]
    for shape in shapes:
        totals = setup_totals(training_bytes(shape, r, adapter_dtype))
        lines.append(f"{shape.name:14} {shape.parameters / 1e9:7.2f}B "
                     + " ".join(f"{totals[name]:17.1f}" for name in SETUPS))
    return "\n".join(lines)


def format_bar_chart(values, width=50, unit="GiB"):
    """Horizontal text bars for a dict label → number, scaled to the largest."""
    largest = max(values.values())
    label_width = max(len(label) for label in values)
    lines = []
    for label, value in values.items():
        bar = "█" * max(1, round(width * value / largest)) if value > 0 else ""
        lines.append(f"{label:<{label_width}} {bar} {value:,.2f} {unit}")
    return "\n".join(lines)


def setup_bar_chart(shape, r=16, adapter_dtype="fp32", width=50):
    """Bar chart of the four set-ups' totals for one model."""
    totals = setup_totals(training_bytes(shape, r, adapter_dtype))
    return f"{shape.name}, LoRA rank {r}, {adapter_dtype} adapters:\n" + format_bar_chart(totals, width)


def model_training_bytes(model):
    """Measured bytes of a loaded model being fine-tuned, by part (activations left out).

    ``model`` is a :class:`qlora_np.models.llama.model.LlamaModel`: its linear layers' frozen
    weights (packed 4-bit + scales, or float), the float tensors it also holds
    (embedding table, norms) and the adapters with their gradients and AdamW moments.
    """
    frozen_linear = sum(layer.base.nbytes for layer in model.linear_layers())
    other = model.embedding.nbytes + model.output_norm.nbytes
    other += sum(norm.nbytes for block in model.blocks for norm in block.norms().values())
    adapters = sum(param.value.nbytes for layer in model.linear_layers()
                   for param in layer.parameters().values())
    return {"frozen linear weights": frozen_linear, "embedding + norms": other,
            "adapters+grads+optimizer": 4 * adapters}
