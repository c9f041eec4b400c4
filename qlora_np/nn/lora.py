"""LoRALinear: a linear layer with a frozen (4-bit or float) weight and trainable low-rank adapters.

    y = x @ W.T + b + scale · dropout(x) @ A.T @ B.T          A: (r, in), B: (out, r)

Forward and backward are written out by hand. The frozen W is never differentiated
and, in the 4-bit modes, never decoded whole: the forward uses ``matmul`` (x @ W.T)
and the backward ``matmul_t`` (g @ W). Both follow the formula one step at a time. The one
exception is a float32 call on a 4-bit W with bfloat16 compute on the CPU. There the adapters
ride along in W's single bfloat16 product: :mod:`qlora_np.nn.fused_adapters` decides that once
per call and makes that product.

Modes:

* ``"qlora"`` — W is a :class:`QuantizedTensor`, adapters train (QLoRA);
* ``"lora"``  — W is a float array, adapters train (LoRA);
* ``"quant"`` — W is a :class:`QuantizedTensor`, no adapters (4-bit inference);
* ``"dense"`` — W is a float array, no adapters (a plain linear layer).

``layer.to("cuda")`` moves W, bias and adapters to the GPU; forward and backward then run
the same steps in float32 with the numba.cuda kernels (:mod:`qlora_np.kernels.cuda.kernels`).
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qlora_np.dtypes import float_dtype_name
from qlora_np.errors import DeviceError, DTypeError, InvalidValueError, ShapeError, UnknownFormatError
from qlora_np.kernels.portable import training as training_cpu
from qlora_np.kernels.low_rank import thin_t_product
from qlora_np.linalg.products import add_low_rank_product, matmul, matmul_t
from qlora_np.nn import fused_adapters
from qlora_np.quant.codec import dequantize, quantize
from qlora_np.quant.backends import DEVICES, cuda_kernels
from qlora_np.quant.tensor import QuantizedTensor
from qlora_np.kernels.cuda.device import is_device_array

MODES = ("qlora", "lora", "quant", "dense")
ADAPTER_MODES = ("qlora", "lora")
INITS = ("kaiming", "gaussian")


class Parameter:
    """A trainable array with its gradient (None until a backward pass writes one)."""

    __slots__ = ("name", "value", "grad")

    def __init__(self, name, value):
        self.name = name
        self.value = value
        self.grad = None

    def accumulate(self, grad):
        """Add ``grad`` to the gradient (gradients add up until ``zero_grad``).

        A first gradient on the GPU is kept as it is, not copied (the layer passes fresh arrays).
        """
        if self.grad is None:
            self.grad = grad if is_device_array(grad) else grad.astype(self.value.dtype, order="C", copy=True)
        elif is_device_array(self.grad):
            cuda_kernels().add_in_place(self.grad, grad)
        else:
            self.grad += grad

    def __repr__(self):
        return f"Parameter({self.name!r}, shape={self.value.shape}, dtype={self.value.dtype})"


@dataclass
class MergeReport:
    """How far the re-quantized merged weight is from the exact float merge W + scale·B@A."""

    max_abs_error: float
    mean_abs_error: float
    relative_frobenius_error: float


class _ForwardCache(NamedTuple):
    """What one caching forward leaves for backward (the arrays are None without active adapters)."""

    lead: tuple              # x's leading dimensions (..., )
    dtype: np.dtype          # compute dtype of the forward
    dropped: np.ndarray      # (rows, in) dropout(x), A's gradient is grad_hidden.T @ dropped;
                             # or x's bfloat16 pairs (rows, ≥ in/2) uint32 where the products
                             # rounded them (no dropout); None after forward(keep_input=False)
                             # otherwise: backward takes x again
    keep: np.ndarray         # (rows, in) bool dropout mask, None without dropout
    hidden: np.ndarray       # (rows, r) dropped @ A.T: B's gradient is g.T @ hidden


class LoRALinear:
    """Linear layer ``y = x @ W.T + b + scale · dropout(x) @ A.T @ B.T`` with hand-written gradients.

    Build one with :meth:`from_weight`. ``lora_a`` (r, in) and ``lora_b`` (out, r) are
    the trainable adapters (B starts at zero, so a new layer computes exactly x @ W.T + b);
    ``base`` is the frozen weight; ``bias`` is frozen unless ``train_bias``.
    """

    def __init__(self, base, bias=None, lora_a=None, lora_b=None, alpha=16, dropout=0.0,
                 mode="qlora", use_rslora=False, train_bias=False, seed=None):
        if mode not in MODES:
            raise UnknownFormatError(f"mode must be one of {MODES}, got {mode!r}")
        quantized = mode in ("qlora", "quant")
        if quantized != isinstance(base, QuantizedTensor):
            kind = "a QuantizedTensor" if quantized else "a float ndarray"
            raise UnknownFormatError(f"mode {mode!r} needs base to be {kind}, got {type(base).__name__}")
        if len(base.shape) != 2:
            raise ShapeError(f"base weight must be 2-D (out, in), got shape {base.shape}")
        if not 0 <= dropout < 1:
            raise InvalidValueError(f"dropout must be in [0, 1), got {dropout}")
        self.mode = mode
        self.base = base
        self.out_features, self.in_features = (int(d) for d in base.shape)
        self.alpha = alpha
        self.dropout = float(dropout)
        self.use_rslora = use_rslora
        self.training = True
        self.merged = False
        self.compute_dtype = "float32"
        """What a 4-bit W's large products multiply in: "bfloat16" rounds x and W to bfloat16
        with float32 sums, as bitsandbytes' compute dtype (faster training; see :func:`qlora_np.matmul`)."""
        self.dropout_rng = np.random.default_rng(seed)
        self._cache = None
        self._unmerged_base = None
        self._params = {}
        if mode in ADAPTER_MODES:
            self._params["lora_a"] = Parameter("lora_a", _checked(lora_a, "lora_a", (None, self.in_features)))
            r = self._params["lora_a"].value.shape[0]
            self._params["lora_b"] = Parameter("lora_b", _checked(lora_b, "lora_b", (self.out_features, r)))
        self.bias = None if bias is None else _checked(bias, "bias", (self.out_features,))
        self.train_bias = bool(train_bias) and bias is not None
        if self.train_bias:
            self._params["bias"] = Parameter("bias", self.bias)

    @classmethod
    def from_weight(cls, weight, bias=None, r=8, alpha=16, dropout=0.0, mode="qlora",
                    quant_type="nf4", blocksize=64, double_quant=True, use_rslora=False,
                    init="kaiming", seed=None, train_bias=False, dtype=np.float32):
        """A layer around a float weight (out, in): quantized for "qlora"/"quant", kept for "lora".
        An already quantized weight (a QuantizedTensor) is used as it is ("qlora"/"quant").

        A is initialised as PEFT does: Kaiming-uniform with a = √5, i.e. U(±1/√in)
        ("kaiming"), or N(0, 1/r) ("gaussian"); B is zero. ``dtype`` is the adapters'
        dtype (float32; float64 for gradient checks).
        """
        quantized = isinstance(weight, QuantizedTensor)          # other modes: __init__ refuses it
        if not quantized:
            weight = np.asarray(weight)
            float_dtype_name(weight.dtype)
        if len(weight.shape) != 2:
            raise ShapeError(f"weight must be 2-D (out, in), got shape {weight.shape}")
        lora_a, lora_b = init_adapters(np.random.default_rng(seed), r, *reversed(weight.shape),
                                       init, dtype)
        if mode not in ADAPTER_MODES:
            lora_a = lora_b = None
        if quantized:
            base = weight
        elif mode in ("qlora", "quant"):
            base = quantize(weight, quant_type, blocksize, double_quant)
        else:
            base = np.array(weight, dtype=np.float64 if weight.dtype == np.float64 else np.float32)
        if bias is not None:
            bias = np.array(bias, dtype=dtype)
        return cls(base, bias, lora_a, lora_b, alpha, dropout, mode, use_rslora, train_bias,
                   seed=None if seed is None else seed + 1)

    # -- attributes ---------------------------------------------------------
    @property
    def has_adapters(self):
        return self.mode in ADAPTER_MODES

    @property
    def r(self):
        return self.lora_a.shape[0] if self.has_adapters else 0

    @property
    def scale(self):
        """alpha / r, or alpha / √r with rsLoRA (rank-stabilised LoRA)."""
        if not self.has_adapters:
            return 0.0
        return self.alpha / np.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def lora_a(self):
        return self._params["lora_a"].value if self.has_adapters else None

    @property
    def lora_b(self):
        return self._params["lora_b"].value if self.has_adapters else None

    @property
    def grad_lora_a(self):
        return self._params["lora_a"].grad if self.has_adapters else None

    @property
    def grad_lora_b(self):
        return self._params["lora_b"].grad if self.has_adapters else None

    @property
    def grad_bias(self):
        return self._params["bias"].grad if self.train_bias else None

    def parameters(self):
        """Trainable parameters by name (``lora_a``, ``lora_b``, and ``bias`` if trained)."""
        return dict(self._params)

    def train(self):
        """Training mode: dropout on, forward caches what backward needs."""
        self.training = True
        return self

    def eval(self):
        """Inference mode: no dropout, nothing cached."""
        self.training = False
        self._cache = None
        return self

    def zero_grad(self):
        for param in self._params.values():
            param.grad = None

    # -- devices --------------------------------------------------------------
    @property
    def device(self):
        """"cuda" when the frozen weight lives on the GPU (see :meth:`to`), else "cpu"."""
        base = self.base.packed if isinstance(self.base, QuantizedTensor) else self.base
        return "cuda" if is_device_array(base) else "cpu"

    def to(self, device):
        """Move W, bias, adapters and their gradients to "cpu" or "cuda"; returns the layer.

        On "cuda" forward and backward run in float32 on the GPU (so the layer's float arrays
        must be float32); x and grad_out may be NumPy arrays (copied over) or device arrays,
        and what they return are device arrays. The optimizer and :meth:`merge` run on the CPU.
        """
        if device not in DEVICES:
            raise UnknownFormatError(f"device must be one of {DEVICES}, got {device!r}")
        floats = [p.value for p in self._params.values()] + [self.bias]
        floats += [] if isinstance(self.base, QuantizedTensor) else [self.base]
        if device == "cuda" and any(a is not None and a.dtype != np.float32 for a in floats):
            raise DTypeError("on the GPU a layer computes in float32; its weight, bias and adapters must be "
                             f"float32, got {sorted({str(a.dtype) for a in floats if a is not None})}")
        if device == self.device:
            return self
        kernels = cuda_kernels()
        move = kernels.to_device if device == "cuda" else kernels.to_host
        self.base = self.base.to(device) if isinstance(self.base, QuantizedTensor) else move(self.base)
        self.bias = None if self.bias is None else move(self.bias)
        for name, param in self._params.items():
            param.value = self.bias if name == "bias" else move(param.value)
            param.grad = None if param.grad is None else move(param.grad)
        self._cache = None
        return self

    # -- forward / backward -------------------------------------------------
    def forward(self, x, cache=None, keep_input=True):
        """x (..., in) → y (..., out).

        Computes in float64 if x or the adapters are float64, else in float32 (the
        4-bit products themselves are float32 either way). When ``cache`` is true
        (default: in training mode only) keeps what :meth:`backward` needs: the
        dropped-out x (or, where bfloat16 products without dropout rounded x, its
        pairs: half the bytes), the dropout mask and x @ A.T — nothing for a layer
        without active adapters, whose backward only needs W. ``keep_input=False``
        leaves a float32 x out, for an x that is cheaper to compute again than to
        keep: :meth:`backward` then takes x again (see :meth:`needs_input_again`).
        """
        cache = self.training if cache is None else cache
        if self.device == "cuda":
            return self._forward_on_gpu(x, cache, keep_input)
        x = np.asarray(x)
        float_dtype_name(x.dtype)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(f"x must have last dimension {self.in_features}, got shape {x.shape}")
        lead = x.shape[:-1]
        dtype = self._compute_dtype(x)
        adapters = self.has_adapters and not self.merged
        fused = fused_adapters.rides_along(self, dtype)                    # chosen once for this call
        x2 = x.reshape(-1, self.in_features).astype(dtype, copy=False)    # (rows, in)

        # 1. dropout(x), for the adapters only: dropped (rows, in), keep (rows, in) bool or None
        keep = dropped = hidden = x_pairs = None
        if adapters:
            keep = self._dropout_keep(x2.shape) if self.training else None
            dropped = x2 if keep is None else self._apply_dropout(x2, keep)
        if fused:
            # 2.–4. x Wᵀ + s·(dropped Aᵀ)Bᵀ in one bfloat16 product (qlora_np.nn.fused_adapters), + b
            y, hidden, x_pairs = fused_adapters.forward(self, x2, dropped, keep)   # (rows, out), (rows, r)
            self._add_bias(y, dtype)
        else:
            # 2. the base product x Wᵀ: (rows, out)
            y = self._base_product(x2).astype(dtype, copy=False)
            # 3. + b
            self._add_bias(y, dtype)
            # 4. + s·(dropped Aᵀ)Bᵀ: hidden = dropped Aᵀ (rows, r), then y += s·hidden Bᵀ in place
            if adapters:
                hidden = dropped @ self.lora_a.T.astype(dtype, copy=False)
                add_low_rank_product(y, self.scale, hidden, self.lora_b.T.astype(dtype, copy=False))

        if cache:                          # a forward without caching leaves an earlier cache alone
            kept = x_pairs if x_pairs is not None else dropped if keep_input else None   # pairs: half of x
            self._cache = _ForwardCache(lead, dtype, kept, keep, hidden)
        return y.reshape(lead + (self.out_features,))

    __call__ = forward

    def backward(self, grad_out, x=None):
        """grad_out (..., out) → grad_x (..., in); adds the adapters' (and bias') gradients.

        Uses up the cache of the last caching forward, as a framework frees its graph:
        a second backward needs a new forward. ``x``: the forward's input again, when
        that forward ran with ``keep_input=False`` (ignored otherwise).
        """
        if self._cache is None:
            raise InvalidValueError("backward needs a forward pass in training mode first "
                                    "(or forward(x, cache=True))")
        if self.device == "cuda":
            return self._backward_on_gpu(grad_out, x)
        lead, dtype, dropped, keep, hidden = self._cache
        grad_out = np.asarray(grad_out)
        float_dtype_name(grad_out.dtype)
        if grad_out.shape != lead + (self.out_features,):
            raise ShapeError(f"grad_out must have shape {lead + (self.out_features,)}, "
                             f"got {grad_out.shape}")
        if hidden is not None and dropped is None:                        # keep_input=False
            x2 = self._input_again(x, lead).astype(dtype, copy=False)       # (rows, in)
            dropped = x2 if keep is None else self._apply_dropout(x2, keep)
        self._cache = None
        g = grad_out.reshape(-1, self.out_features).astype(dtype, copy=False)   # (rows, out)

        # 1. grad_b = Σ_rows g: (out,)
        if self.train_bias:
            self._params["bias"].accumulate(g.sum(axis=0))
        if hidden is None:                 # no active adapters: grad_x = g W, nothing else to learn
            return self._base_product_t(g).astype(dtype, copy=False).reshape(lead + (self.in_features,))
        fused = keep is None and fused_adapters.rides_along(self, dtype)    # chosen once for this call
        g_for_b = g                        # what B's gradient reads: g (rows, out), or g's bfloat16 pairs
        if fused:
            # 2.–3. grad_hidden and grad_x in one bfloat16 product (qlora_np.nn.fused_adapters)
            grad_x, grad_hidden, g_for_b = fused_adapters.backward(self, g, dtype)
        else:
            lora_a = self.lora_a.astype(dtype, copy=False)                  # (r, in)
            lora_b = self.lora_b.astype(dtype, copy=False)                  # (out, r)
            # 2. grad_hidden = s · g B: (rows, r)
            grad_hidden = self.scale * (g @ lora_b)
            # 3. grad_x = g W + dropout'(grad_hidden A): (rows, in), the mask applied again
            grad_x = self._base_product_t(g).astype(dtype, copy=False)
            if keep is None:
                add_low_rank_product(grad_x, 1.0, grad_hidden, lora_a)
            else:
                grad_x += self._apply_dropout(grad_hidden @ lora_a, keep)
        # 4. grad_B = s · gᵀ hidden: (out, r), made as its transpose (r, out) in one pass
        grad_b_t = self.scale * thin_t_product(hidden, g_for_b, self.out_features)
        self._params["lora_b"].accumulate(grad_b_t.T)
        # 5. grad_A = grad_hiddenᵀ dropped: (r, in)
        self._params["lora_a"].accumulate(thin_t_product(grad_hidden, dropped, self.in_features))
        return grad_x.reshape(lead + (self.in_features,))

    def needs_input_again(self):
        """Whether :meth:`backward` needs the forward's x passed again: after a forward with
        ``keep_input=False`` that kept neither x nor its bfloat16 pairs."""
        return self._cache is not None and self._cache.hidden is not None and self._cache.dropped is None

    def _forward_on_gpu(self, x, cache, keep_input):
        """:meth:`forward` with the layer on the GPU: the same steps, float32, on device arrays."""
        gpu = cuda_kernels()
        x2, lead = gpu.as_rows(x, self.in_features, "x")                      # (rows, in)
        y = self._base_product(x2)                                            # (rows, out)
        if self.bias is not None:
            gpu.add_row(y, self.bias)
        keep = dropped = hidden = None
        if self.has_adapters and not self.merged:
            keep = self._dropout_keep(tuple(x2.shape)) if self.training else None
            keep = None if keep is None else gpu.to_device(keep)              # (rows, in) bool
            dropped = x2 if keep is None else gpu.masked_scale(x2, keep, self._keep_scale(np.float32))
            hidden = gpu.gemm(dropped, self.lora_a, transpose_b=True)         # (rows, r)
            gpu.gemm(hidden, self.lora_b, transpose_b=True, alpha=self.scale, out=y, beta=1)
        if cache:
            self._cache = _ForwardCache(lead, np.dtype(np.float32), dropped if keep_input else None, keep,
                                        hidden)
        return y.reshape(lead + (self.out_features,))

    def _backward_on_gpu(self, grad_out, x):
        """:meth:`backward` with the layer on the GPU: the same steps, float32, on device arrays."""
        gpu = cuda_kernels()
        lead, _, dropped, keep, hidden = self._cache
        g, grad_lead = gpu.as_rows(grad_out, self.out_features, "grad_out")  # (rows, out)
        if grad_lead != lead:
            raise ShapeError(f"grad_out must have shape {lead + (self.out_features,)}, "
                             f"got {grad_lead + (self.out_features,)}")
        if hidden is not None and dropped is None:                          # keep_input=False
            dropped = gpu.as_rows(self._input_again(x, lead), self.in_features, "x")[0]   # (rows, in)
            if keep is not None:
                dropped = gpu.masked_scale(dropped, keep, self._keep_scale(np.float32))
        self._cache = None

        grad_x = self._base_product_t(g)                                      # (rows, in): g @ W
        if self.train_bias:
            self._params["bias"].accumulate(gpu.column_sums(g))
        if hidden is not None:
            self._params["lora_b"].accumulate(gpu.gemm(g, hidden, transpose_a=True, alpha=self.scale))
            grad_hidden = gpu.gemm(g, self.lora_b, alpha=self.scale)          # (rows, r)
            self._params["lora_a"].accumulate(gpu.gemm(grad_hidden, dropped, transpose_a=True))
            grad_dropped = gpu.gemm(grad_hidden, self.lora_a)                 # (rows, in)
            if keep is not None:
                grad_dropped = gpu.masked_scale(grad_dropped, keep, self._keep_scale(np.float32))
            gpu.add_in_place(grad_x, grad_dropped)
        return grad_x.reshape(lead + (self.in_features,))

    def _input_again(self, x, lead):
        """The input x given to backward after a forward with ``keep_input=False``, as (rows, in)."""
        if x is None:
            raise InvalidValueError("the forward ran with keep_input=False: pass its input x to backward")
        x = x if is_device_array(x) else np.asarray(x)
        if tuple(x.shape) != lead + (self.in_features,):
            raise ShapeError(f"x must have the forward's shape {lead + (self.in_features,)}, got {x.shape}")
        return x.reshape(-1, self.in_features)

    def _add_bias(self, y, dtype):
        """y += b in place (nothing without a bias): y (rows, out) in ``dtype``."""
        if self.bias is not None:
            y += self.bias.astype(dtype, copy=False)

    def _compute_dtype(self, x):
        adapters = self.lora_a.dtype if self.has_adapters else np.float32
        return np.dtype(np.float64 if np.float64 in (x.dtype, adapters) else np.float32)

    def _base_product(self, x2):
        if isinstance(self.base, QuantizedTensor):
            return matmul(x2, self.base, compute_dtype=self.compute_dtype)
        if self.device == "cuda":
            return cuda_kernels().gemm(x2, self.base, transpose_b=True)
        return x2 @ self.base.T

    def _base_product_t(self, g):
        if isinstance(self.base, QuantizedTensor):
            return matmul_t(g, self.base, compute_dtype=self.compute_dtype)
        if self.device == "cuda":
            return cuda_kernels().gemm(g, self.base)
        return g @ self.base

    def _dropout_keep(self, shape):
        """Which values dropout keeps, (rows, in) bool, each kept with probability 1 − p; None if p = 0."""
        if self.dropout == 0:
            return None
        return training_cpu.dropout_keep(self.dropout_rng.bit_generator.random_raw(), shape, self.dropout)

    def _apply_dropout(self, values, keep):
        """Inverted dropout: dropped values are zero, kept ones scaled by 1/(1 − p).

        The same function of the mask serves forward (on x) and backward (on the gradient).
        """
        scale = self._keep_scale(values.dtype.type)
        if values.dtype == np.float32 and values.flags.c_contiguous:
            return training_cpu.apply_dropout(values, keep, scale)
        return apply_dropout(values, keep, scale)

    def _keep_scale(self, float_type):
        """1 / (1 − p), the factor inverted dropout scales kept values by, as ``float_type``."""
        return float_type(1.0 / (1.0 - self.dropout))

    # -- merging ------------------------------------------------------------
    def delta_weight(self):
        """scale · B @ A, the adapters' update to W: (out, in)."""
        return self.scale * (self.lora_b @ self.lora_a)

    def merge(self, requantize=False):
        """Fold the adapters into the base: W' = W + scale·B@A; forward then skips them.

        lora mode adds in place. qlora mode keeps the original 4-bit weight for
        :meth:`unmerge` and stores W' as a float32 array, or with ``requantize`` in 4 bits
        again (same format), returning a :class:`MergeReport` of what that rounding cost.
        """
        if not self.has_adapters:
            raise InvalidValueError(f"a {self.mode!r} layer has no adapters to merge")
        if self.device != "cpu":
            raise DeviceError("merge runs on the CPU: call layer.to('cpu') first")
        if self.merged:
            raise InvalidValueError("layer is already merged")
        if requantize and self.mode == "lora":
            raise InvalidValueError("requantize needs a 4-bit base; a 'lora' layer merges in float")
        report = None
        if self.mode == "lora":
            self.base += self.delta_weight().astype(self.base.dtype)
        else:
            self._unmerged_base = self.base
            merged = dequantize(self.base, dtype="float32") + self.delta_weight().astype(np.float32)
            if requantize:
                old = self.base
                self.base = quantize(merged, old.quant_type, old.blocksize, old.double_quant,
                                     old.strategy)
                error = dequantize(self.base, dtype="float32").astype(np.float64) - merged
                report = MergeReport(float(np.abs(error).max()), float(np.abs(error).mean()),
                                     float(np.linalg.norm(error) / max(np.linalg.norm(merged), 1e-30)))
            else:
                self.base = merged
        self.merged = True
        self._cache = None
        return report

    def unmerge(self):
        """Undo :meth:`merge` (exactly for qlora; up to float rounding for lora)."""
        if not self.merged:
            raise InvalidValueError("layer is not merged")
        if self.device != "cpu":
            raise DeviceError("unmerge runs on the CPU: call layer.to('cpu') first")
        if self.mode == "lora":
            self.base -= self.delta_weight().astype(self.base.dtype)
        else:
            self.base, self._unmerged_base = self._unmerged_base, None
        self.merged = False
        self._cache = None

    # -- sizes ----------------------------------------------------------------
    def trainable_parameters(self):
        """Number of trainable values (adapters, and the bias if trained)."""
        return sum(p.value.size for p in self._params.values())

    def total_parameters(self):
        """Number of values of the layer: W's elements + bias + adapters."""
        adapters = self.lora_a.size + self.lora_b.size if self.has_adapters else 0
        bias = 0 if self.bias is None else self.bias.size
        return self.out_features * self.in_features + bias + adapters

    def memory_report(self, optimizer_moments=2):
        """Exact bytes of each part: base codes, quantization constants, adapters, grads, optimizer.

        ``optimizer_moments`` float arrays per trainable value (AdamW keeps 2).
        """
        report = {"base_weight": 0, "quant_constants": 0}
        if isinstance(self.base, QuantizedTensor):
            report["base_weight"] = self.base.packed.nbytes
            report["quant_constants"] = self.base.nbytes - self.base.packed.nbytes
        else:
            report["base_weight"] = self.base.nbytes
        report["bias"] = 0 if self.bias is None else self.bias.nbytes
        report["adapters"] = self.lora_a.nbytes + self.lora_b.nbytes if self.has_adapters else 0
        trainable_bytes = sum(p.value.nbytes for p in self._params.values())
        report["gradients"] = trainable_bytes
        report["optimizer_state"] = optimizer_moments * trainable_bytes
        report["total"] = sum(report.values())
        return report

    def __repr__(self):
        return (f"LoRALinear(in={self.in_features}, out={self.out_features}, mode={self.mode!r}, "
                f"r={self.r}, alpha={self.alpha}, merged={self.merged})")


def dropout_keep(seed, shape, p):
    """Which of ``shape`` (rows, cols) values inverted dropout keeps, drawn from one 64-bit
    seed: the reference of :func:`qlora_np.kernels.portable.training.dropout_keep` (same bytes).

    Value i (row-major) is kept when the top 32 bits of SplitMix64's hash of
    seed + (i + 1)·γ reach round(p · 2³²): each kept with probability 1 − p (to 2⁻³²).
    One seed per mask, hashed in parallel, costs a fifth of drawing a float per value.
    """
    index = np.arange(1, int(np.prod(shape)) + 1, dtype=np.uint64)               # (rows·cols,)
    # 1. spread the indices with the golden-ratio step (wrapping mod 2⁶⁴)
    z = np.uint64(seed) + index * np.uint64(0x9E3779B97F4A7C15)
    # 2. SplitMix64's mixing: two xor-shift-multiply rounds and a final xor-shift
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    # 3. keep the values whose top 32 bits are not below p's threshold
    return (z >> np.uint64(32) >= np.uint64(round(p * 2 ** 32))).reshape(shape)


def apply_dropout(values, keep, scale):
    """values · keep · scale: the reference of :func:`qlora_np.kernels.portable.training.apply_dropout`."""
    return values * keep * scale


def init_adapters(rng, r, in_features, out_features, init="kaiming", dtype=np.float32):
    """New adapters (A (r, in), B (out, r)) as PEFT starts them: B = 0, A Kaiming-uniform
    with a = √5, i.e. U(±1/√in) ("kaiming"), or N(0, 1/r) ("gaussian")."""
    if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or r < 1:
        raise InvalidValueError(f"rank r must be a positive int, got {r!r}")
    if init not in INITS:
        raise UnknownFormatError(f"init must be one of {INITS}, got {init!r}")
    if init == "kaiming":
        bound = 1.0 / np.sqrt(in_features)
        lora_a = rng.uniform(-bound, bound, (r, in_features)).astype(dtype)
    else:
        lora_a = rng.normal(0.0, 1.0 / r, (r, in_features)).astype(dtype)
    return lora_a, np.zeros((out_features, r), dtype)


def _checked(array, name, shape):
    """``array`` as a float ndarray of ``shape`` (None in shape = any size), else a typed error."""
    if array is None:
        raise ShapeError(f"{name} is required")
    array = np.asarray(array)
    float_dtype_name(array.dtype)
    if array.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, array.shape)):
        expected = tuple("any" if s is None else s for s in shape)
        raise ShapeError(f"{name} must have shape {expected}, got {array.shape}")
    return array
