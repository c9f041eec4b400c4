"""asv suites: 4-bit quantize / dequantize of a 4096×4096 float32 matrix.

``np.copy`` of the same arrays sits in the same suites, so every asv report shows
the kernels next to the memory-bound floor they are measured against (issue 3
targets: quantize NF4 ≥ 1 G elements/s on 2 cores, dequantize ≤ 2× ``np.copy``).
"""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")   # before NumPy: no BLAS thread hand-off stalls

import numpy as np  # noqa: E402

import qlora_np  # noqa: E402

SIDE = 4096


class Quantize:
    """quantize(4096×4096 float32) per format, with np.copy of the input as the baseline."""

    params = (["nf4", "fp4", "int4", "int4_asym"], [False, True])
    param_names = ["quant_type", "double_quant"]

    def setup(self, quant_type, double_quant):
        self.weight = np.random.default_rng(0).standard_normal((SIDE, SIDE), np.float32)
        qlora_np.quantize(self.weight[:64], quant_type, 64, double_quant)   # compile outside the timing

    def time_quantize(self, quant_type, double_quant):
        qlora_np.quantize(self.weight, quant_type, 64, double_quant)

    def time_np_copy_of_input(self, quant_type, double_quant):
        np.copy(self.weight)

    def peakmem_quantize(self, quant_type, double_quant):
        qlora_np.quantize(self.weight, quant_type, 64, double_quant)


class Dequantize:
    """dequantize(4096×4096) per format, with np.copy of the float32 output as the baseline."""

    params = (["nf4", "fp4", "int4_asym"], [False, True])
    param_names = ["quant_type", "double_quant"]

    def setup(self, quant_type, double_quant):
        weight = np.random.default_rng(0).standard_normal((SIDE, SIDE), np.float32)
        self.qt = qlora_np.quantize(weight, quant_type, 64, double_quant)
        self.output = qlora_np.dequantize(self.qt)                          # also compiles

    def time_dequantize(self, quant_type, double_quant):
        qlora_np.dequantize(self.qt)

    def time_np_copy_of_output(self, quant_type, double_quant):
        np.copy(self.output)


class Matmul:
    """x @ W.T with W quantized (out=in=4096) against NumPy on the dense float32 W."""

    params = [1, 32, 1024]
    param_names = ["rows"]

    def setup(self, rows):
        rng = np.random.default_rng(0)
        self.weight = rng.standard_normal((SIDE, SIDE), np.float32)
        self.qt = qlora_np.quantize(self.weight, "nf4", 64, True)
        self.x = rng.standard_normal((rows, SIDE), np.float32)
        qlora_np.matmul(self.x, self.qt)
        qlora_np.matmul(self.x, self.qt, compute_dtype="bfloat16")

    def time_matmul_nf4(self, rows):
        qlora_np.matmul(self.x, self.qt)

    def time_matmul_nf4_bfloat16(self, rows):
        """The same in bfloat16 (only batches above 256 rows use it; fewer stay float32)."""
        qlora_np.matmul(self.x, self.qt, compute_dtype="bfloat16")

    def time_matmul_nf4_int8_activations(self, rows):
        qlora_np.matmul(self.x, self.qt, int8_activations=True)

    def time_numpy_dense(self, rows):
        self.x @ self.weight.T
