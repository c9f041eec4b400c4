"""qlora_np — QLoRA without a deep-learning framework.

Packed 4-bit weights (NF4 / FP4 / INT4, bit-exact with bitsandbytes) in NumPy arrays,
Numba kernels to quantize, decode and multiply them, a manual-gradient LoRA layer with
AdamW, and a plain-NumPy reference of every step to read.

The layers, bottom to top (each imports only from those below it; ARCHITECTURE.md beside
this file walks through them): ``errors``/``dtypes``/``runtime`` → ``quant.codebooks`` →
``kernels`` → ``quant`` → ``linalg`` → ``nn`` → ``io`` (file formats) → ``models`` →
``io`` (model files) → ``train`` → ``cli``/``demo``.

Importing the package loads nothing but this file: each public name below is imported
the first time it is used, and nothing in the process (environment, allocator, CPU
state) changes until the user asks: :func:`qlora_np.runtime.configure` tunes threads and
the allocator, as the ``qlora-np`` command does.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "qlora_np.quant.codec": ("quantize", "dequantize"),
    "qlora_np.quant.tensor": ("QuantizedTensor", "BNB_BLOCKSIZES"),
    "qlora_np.quant.codebooks": ("FORMATS", "derive_nf4_codebook", "dynamic_map"),
    "qlora_np.dtypes": ("bfloat16_from_bits",),
    "qlora_np.linalg": ("matmul", "matmul_t", "explain"),
    "qlora_np.nn.lora": ("LoRALinear", "Parameter", "MergeReport"),
    "qlora_np.models.llama.model": ("LlamaModel",),
    "qlora_np.models.llama.lora": ("inject_lora", "loss_and_backward", "print_trainable_parameters"),
    "qlora_np.train.data": ("load_examples", "split_examples"),
    "qlora_np.train.trainer": ("TrainConfig", "Trainer"),
    "qlora_np.io.gguf_export": ("save_gguf_adapter", "load_gguf_adapter", "save_merged_gguf"),
    "qlora_np.io.peft": ("save_peft", "load_peft"),
    "qlora_np.io.bnb": ("save_bnb_model", "load_bnb_model", "save_merged_hf"),
    "qlora_np.io.convert": ("quantize_checkpoint",),
    "qlora_np.errors": ("QLoraError", "InvalidValueError", "ShapeError", "DTypeError", "BlocksizeError",
                        "UnknownFormatError", "StateDictError", "CheckpointError", "DataError",
                        "DataWarning", "DeviceError"),
}
"""Where each public name lives."""

_MODULES = {"optim": "qlora_np.nn.optim", "memory": "qlora_np.train.memory",
            "llama": "qlora_np.models.llama.model", "llama_lora": "qlora_np.models.llama.lora"}
"""Modules reachable as attributes of the package (``qlora_np.optim.AdamW``), as before the
layers had packages of their own (CHANGELOG.md lists every move)."""

_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = [*_HOME, "optim", "memory"]


def __getattr__(name):
    """Import a public name (or module alias) the first time it is asked for."""
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'qlora_np' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_HOME, *_MODULES})
