"""Training memory of full fine-tuning, LoRA and QLoRA, computed from a model's shape.

Counts the bytes that do not depend on batch size — weights, gradients, optimizer
state, quantization constants — for LLaMA-style models. Activations are left out
(they depend on batch, sequence length and checkpointing). Assumptions, per value:

* full fp32:  weight 4 + gradient 4 + AdamW moments 8              = 16 bytes
* full fp16:  weight 2 + gradient 2 + AdamW moments in fp32 8     = 12 bytes
* LoRA:       frozen fp16 weight 2; adapters fp32 with gradient and AdamW (16 bytes)
* QLoRA:      frozen linear weights in NF4 with double quant (blocksize 64, nested 256):
              4 + 8/64 + 32/(64·256) bits; embeddings and norms stay fp16 (as in QLoRA);
              adapters as LoRA.
"""

from dataclasses import dataclass

GIB = 1024 ** 3


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
        """Adapter values for rank r on every linear layer: r · (in + out) each."""
        return self.layers * sum(r * (out + inp) for out, inp in self.linear_shapes)


LLAMA_SHAPES = {
    "7B": ModelShape("LLaMA-2 7B", 4096, 32, 11008, 32, 32, 32000),
    "13B": ModelShape("LLaMA-2 13B", 5120, 40, 13824, 40, 40, 32000),
    "70B": ModelShape("LLaMA-2 70B", 8192, 80, 28672, 64, 8, 32000),
}

NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)
"""Bits per weight of NF4 with double quant: codes + 8-bit scales + a float32 per 256 scales."""

ADAPTER_BYTES = 4 + 4 + 8
"""fp32 adapter value + its gradient + two AdamW moments."""

SETUPS = ("full fp32", "full fp16", "LoRA (fp16 base)", "QLoRA (NF4 base)")


def training_bytes(shape, r=16):
    """Bytes of each set-up in :data:`SETUPS` for ``shape``, as a dict of dicts of parts."""
    n = shape.parameters
    adapters = shape.lora_parameters(r) * ADAPTER_BYTES
    return {
        "full fp32": {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n},
        "full fp16": {"weights": 2 * n, "gradients": 2 * n, "optimizer": 8 * n},
        "LoRA (fp16 base)": {"weights": 2 * n, "adapters+grads+optimizer": adapters},
        "QLoRA (NF4 base)": {"weights": int(shape.linear_parameters * NF4_DQ_BITS / 8)
                             + 2 * shape.other_parameters,
                             "adapters+grads+optimizer": adapters},
    }


def format_scaling_table(r=16, shapes=None):
    """A text table: parameters and GiB per set-up for 7B / 13B / 70B (or ``shapes``)."""
    shapes = list(LLAMA_SHAPES.values()) if shapes is None else shapes
    header = f"{'model':14} {'params':>8} " + " ".join(f"{name:>17}" for name in SETUPS)
    lines = [f"Training memory without activations, LoRA rank {r} on all linear layers (GiB)",
             header, "-" * len(header)]
    for shape in shapes:
        totals = {name: sum(parts.values()) / GIB for name, parts in training_bytes(shape, r).items()}
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


def setup_bar_chart(shape, r=16, width=50):
    """Bar chart of the four set-ups' totals for one model."""
    totals = {name: sum(parts.values()) / GIB for name, parts in training_bytes(shape, r).items()}
    return f"{shape.name}, LoRA rank {r}:\n" + format_bar_chart(totals, width)
