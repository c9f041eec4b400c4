"""qlora_np — QLoRA without a deep-learning framework.

Packed 4-bit weights (NF4 / FP4 / INT4, bit-exact with bitsandbytes) in NumPy
arrays, Numba kernels to quantize and decode them, and a plain-NumPy reference of
every step to read.
"""

import os

# OpenBLAS threads spin for a long while after each call and then hold the cores the
# Numba kernels run on next; training alternates the two hundreds of times a step
# (measured: 1.8x faster steps on 2 cores). Takes effect only when qlora_np is
# imported before NumPy; a value set by the user wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")
# The same the other way round: after each parallel kernel, Numba's OpenMP threads
# (GNU libgomp) spin before they sleep, and a spinning thread holds a core through the
# NumPy (BLAS) calls that follow, while a sleeping one takes ~0.1 ms to wake on this VM
# for the next kernel (a bfloat16 step launches ~1,500). 30,000 rounds balance the two:
# against 3,000, float32 steps the same (3.05 s), bfloat16 steps 1.37 → 1.23 s, decoding
# 155–158 → 165–175 tok/s; 60,000 already slowed float32 steps to 3.4 s, and libgomp's
# own default (300,000 rounds) to 5 s. Takes effect when qlora_np is imported before the
# first parallel Numba kernel runs.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from .allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()          # a training step's activations are reused, not faulted in anew each step

from .codebooks import FORMATS, derive_nf4_codebook, dynamic_map
from .dtypes import bfloat16_from_bits
from .errors import (BlocksizeError, CheckpointError, DataError, DataWarning, DeviceError, DTypeError,
                     InvalidValueError, QLoraError, ShapeError, StateDictError, UnknownFormatError)
from .ops import dequantize, matmul, matmul_t, quantize
from .tensor import BNB_BLOCKSIZES, QuantizedTensor
from .lora import LoRALinear, MergeReport, Parameter
from .llama import LlamaModel
from .llama_lora import inject_lora, loss_and_backward, print_trainable_parameters
from .data import load_examples, split_examples
from .train import TrainConfig, Trainer
from .gguf_export import load_gguf_adapter, save_gguf_adapter, save_merged_gguf
from .peft_io import load_peft, save_peft
from .bnb_io import load_bnb_model, save_bnb_model, save_merged_hf
from .convert import quantize_checkpoint
from . import memory, optim

__version__ = "0.1.0"

__all__ = [
    "quantize", "dequantize", "matmul", "matmul_t", "QuantizedTensor", "FORMATS", "BNB_BLOCKSIZES",
    "LoRALinear", "Parameter", "MergeReport", "optim", "memory",
    "LlamaModel", "inject_lora", "loss_and_backward", "print_trainable_parameters",
    "load_examples", "split_examples", "TrainConfig", "Trainer",
    "save_gguf_adapter", "load_gguf_adapter", "save_merged_gguf", "save_peft", "load_peft",
    "save_bnb_model", "load_bnb_model", "save_merged_hf", "quantize_checkpoint",
    "derive_nf4_codebook", "dynamic_map", "bfloat16_from_bits",
    "QLoraError", "InvalidValueError", "ShapeError", "DTypeError", "BlocksizeError",
    "UnknownFormatError", "StateDictError", "CheckpointError", "DataError", "DataWarning", "DeviceError",
]
