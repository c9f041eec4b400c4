"""4-bit formats: codebooks, :class:`~qlora_np.quant.tensor.QuantizedTensor`, the plain-NumPy
reference of quantize / pack / double quant, and the quantize / dequantize API.

Reading order: ``codebooks`` (what a code means) → ``reference`` (the algorithm in NumPy) →
``backends`` (which kernels run it) → ``tensor`` (what a quantized weight holds) →
``codec`` (the public functions that validate and dispatch).
"""
