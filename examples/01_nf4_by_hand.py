"""NF4 by hand: every step of QLoRA's 4-bit format in a few lines of NumPy.

We build the NF4 codebook from normal quantiles, quantize one block of weights,
double-quantize the block scales of a whole matrix, decode everything again, and
finally check that qlora_np produces the very same bytes and values.

Run:  python examples/01_nf4_by_hand.py
"""

import numpy as np
from scipy.stats import norm

import qlora_np
from qlora_np.quant.codebooks import dynamic_map
from qlora_np.quant.reference import torch_mean_float32

np.set_printoptions(precision=4, suppress=True, linewidth=100)
rng = np.random.default_rng(0)

# ---------------------------------------------------------------------------
# 1. The NF4 codebook: 16 values at quantiles of a standard normal
# ---------------------------------------------------------------------------
# Weights of trained networks are roughly normal, so NF4 puts its 16 levels where a
# normal distribution has equal probability mass. To represent 0 exactly it uses 8
# positive levels and 7 negative ones. The outermost quantile is not 1 - 1/32 nor
# 1 - 1/30 but their mean (QLoRA, appendix E), and the probabilities are spaced the
# way float32 torch.linspace spaces them (qlora_np.quant.codebooks.torch_linspace_float32
# reproduces that rounding for the bit-exact table; plain linspace is enough here).
offset = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))                     # 0.9677083…
positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])             # (8,) largest first
negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])            # (7,)
levels = np.sort(np.concatenate([negative, [0.0], positive]))     # (16,)
nf4 = (levels / levels.max()).astype(np.float32)                  # (16,) in [-1, 1]
print("NF4 codebook derived by hand:\n", nf4)

library_nf4 = qlora_np.FORMATS["nf4"].codebook
assert np.allclose(nf4, library_nf4, atol=2e-7), "derivation disagrees with the library"
nf4 = library_nf4                                # from here on: the bit-exact table

# ---------------------------------------------------------------------------
# 2. Quantize one block of 64 weights
# ---------------------------------------------------------------------------
block = rng.normal(0, 0.02, 64).astype(np.float32)                # (64,) one block
absmax = np.abs(block).max()                                       # the block's scale
scaled = block * (np.float32(1) / absmax)                          # (64,) in [-1, 1]
# nearest codebook entry; on an exact midpoint the lower entry wins (bnb's rule),
# which is what argmin's "first minimum" gives for a sorted codebook
codes = np.abs(scaled[:, None] - nf4[None, :]).argmin(axis=1).astype(np.uint8)   # (64,)
# two codes per byte, the first element in the high nibble
packed = (codes[0::2] << 4) | codes[1::2]                          # (32,) uint8
print(f"\nblock absmax {absmax:.5f}; first 8 codes {codes[:8]} → bytes {packed[:4]}")

decoded = nf4[codes] * absmax                                      # (64,)
print(f"largest error in the block: {np.abs(decoded - block).max():.2e} "
      f"(at most half the widest codebook gap × absmax = "
      f"{0.5 * np.diff(nf4).max() * absmax:.2e})")

qt = qlora_np.quantize(block, "nf4", blocksize=64)
assert qt.packed.tobytes() == packed.tobytes()
assert qt.absmax.tobytes() == np.array([absmax], np.float32).tobytes()
assert np.array_equal(qlora_np.dequantize(qt), decoded)

# ---------------------------------------------------------------------------
# 3. Double quantization: compress the scales of a whole matrix to 8 bits
# ---------------------------------------------------------------------------
# A (512, 256) weight in blocks of 64 has 2048 float32 scales = 0.5 bits/parameter.
# QLoRA subtracts their mean and stores them as 8-bit codes of a "dynamic" map, with
# one float32 scale per chunk of 256 scales: 8/64 + 32/(64·256) ≈ 0.127 bits/param.
weight = rng.normal(0, 0.02, (512, 256)).astype(np.float32)
blocks = weight.reshape(-1, 64)                                    # (2048, 64)
scales = np.abs(blocks).max(axis=1)                                # (2048,) float32

# 3a. the offset is the mean of the scales. bitsandbytes takes it with torch, whose
#     summation order differs from NumPy's; the library reproduces that order
#     exactly, because a 1-ulp different mean changes the stored codes.
mean = torch_mean_float32(scales)
print(f"\nscale mean: torch order {mean:.9g}, NumPy order {scales.mean(dtype=np.float32):.9g}")
centred = scales - mean                                            # (2048,) signed

# 3b. 8-bit blockwise quantization of the centred scales, 256 at a time
table = dynamic_map()                                              # (256,) sorted, [-1, 1]
chunks = centred.reshape(-1, 256)                                  # (8, 256)
chunk_absmax = np.abs(chunks).max(axis=1)                          # (8,)
chunk_scaled = chunks * (np.float32(1) / chunk_absmax)[:, None]    # (8, 256) in [-1, 1]
scale_codes = np.abs(chunk_scaled[..., None] - table).argmin(axis=-1).astype(np.uint8)

# 3c. decode: map value × chunk absmax + mean
decoded_scales = (table[scale_codes] * chunk_absmax[:, None]).reshape(-1) + mean   # (2048,)
print(f"scale error after double quant: max {np.abs(decoded_scales - scales).max():.2e} "
      f"(scales are about {scales.mean():.3f})")

qt = qlora_np.quantize(weight, "nf4", blocksize=64, double_quant=True)
assert qt.offset == mean
assert np.array_equal(qt.nested_absmax, chunk_absmax)
# bitsandbytes rounds through a 65536-point lookup grid rather than a true nearest
# search; the two can differ only for values within ~1/65535 of a midpoint
same = np.mean(qt.absmax == scale_codes.reshape(-1))
print(f"8-bit codes equal to the library's (nearest search vs bnb's grid): {same:.2%}")
assert same > 0.99

# ---------------------------------------------------------------------------
# 4. Dequantize the whole matrix, by hand and with the library
# ---------------------------------------------------------------------------
library_scales = qlora_np.quant.backends.scales(qt)                           # (2048,) float32
codes = np.stack([qt.packed >> 4, qt.packed & 0x0F], axis=1).reshape(-1)          # (131072,)
by_hand = (nf4[codes].reshape(-1, 64) * library_scales[:, None]).reshape(weight.shape)
assert np.array_equal(by_hand, qlora_np.dequantize(qt))

error = by_hand - weight
print(f"\nmatrix round trip: relative Frobenius error {np.linalg.norm(error) / np.linalg.norm(weight):.3f}")
print(f"storage: {qt.nbytes} bytes = {8 * qt.nbytes / weight.size:.3f} bits/param "
      f"(fp32 {weight.nbytes} bytes, {weight.nbytes / qt.nbytes:.2f}× larger)")
print("\nall hand-computed steps equal qlora_np's output")
