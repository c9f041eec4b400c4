"""A Llama-architecture language model in NumPy: load from GGUF, forward with a KV cache, generate.

Weights stay in the GGUF layout: linear weights (out, in) used as ``x @ W.T``, and the
rows of q and k permuted within each head so that RoPE rotates adjacent pairs
(x[2i], x[2i+1]) — llama.cpp's "NORM" rope. Every linear layer is a
:class:`~qlora_np.nn.lora.LoRALinear`: ``"quant"`` (4-bit) or ``"dense"`` (float) until
adapters are injected.

Per block, with n = RMSNorm(x)·g:
    x += Wo · attention(RoPE(Wq n), RoPE(Wk n), Wv n)      (causal, grouped-query)
    x += Wdown · (silu(Wgate m) * Wup m),  m = RMSNorm(x)·g'
logits = RMSNorm(x)·g_out @ E_out.T (E_out is the token embedding when tied).

That is a Llama. The related architectures switch on parts of the same pass through their
:class:`~qlora_np.models.llama.config.LlamaConfig` (see :mod:`~qlora_np.models.llama.architectures`):
biases on the products, an RMSNorm over each head of q and k, per-layer sliding windows and
RoPE bases (none: cos 1, sin 0), GeGLU for SwiGLU, norms after attention and the MLP, scaled
embeddings, residuals and logits, and soft-capped scores and logits.

The steps run on the Numba kernels of :mod:`qlora_np.kernels.portable.llama` and the fused
4-bit products. With ``backend="reference"`` they run on the plain NumPy functions of the same
names in :mod:`qlora_np.models.llama.reference` instead (see :meth:`LlamaModel.set_backend`).
"""

import os
from dataclasses import replace

import gguf
import numpy as np

from qlora_np.errors import CheckpointError, DeviceError, InvalidValueError, ShapeError
from qlora_np.io.gguf import decode_tensor
from qlora_np.io.safetensors import read_checkpoint_tensors
from qlora_np.kernels.portable import llama as llama_cpu
from qlora_np.linalg.plan import FUSED_MAX_ROWS, compute_dtype_name, fuse_together
from qlora_np.linalg.products import fused_product
from qlora_np.models.llama import reference
from qlora_np.models.llama.config import LlamaBlock, LlamaConfig
from qlora_np.models.llama.hf import bnb_model_parts, is_bitsandbytes_folder
from qlora_np.models.llama.names import (LINEAR_NAMES, block_norm_names, gguf_tensor_names, gguf_tensor_shapes,
                                         hf_to_gguf_weights)
from qlora_np.models.llama.support import check_shapes, check_tensors
from qlora_np.models.tokenizer import Tokenizer
from qlora_np.nn.lora import LoRALinear
from qlora_np.quant.codec import dequantize, quantize
from qlora_np.quant.tensor import QuantizedTensor

BACKENDS = ("kernels", "reference")
"""What :meth:`LlamaModel.forward` runs on: the Numba kernels, or their NumPy references."""


class KVCache:
    """Keys and values of every layer for positions 0 … length-1: (layers, kv_heads, max_len, head_dim)."""

    def __init__(self, config, max_len):
        shape = (config.num_layers, config.num_kv_heads, max_len, config.head_dim)
        self.keys = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)
        self.length = 0

    @property
    def max_len(self):
        return self.keys.shape[2]


class LlamaModel:
    """Token ids → logits, with a KV cache for generation.

    ``backend`` "kernels" (default) or "reference": see :meth:`set_backend`.
    """

    def __init__(self, config, embedding, blocks, output_norm, output, tokenizer=None, tied_output=True,
                 backend="kernels"):
        self.config = config
        self.tied_output = tied_output              # the LM head reuses the token embedding
        self.embedding = embedding                  # (vocab, hidden) float32, for the lookup
        self.blocks = blocks
        self.output_norm = output_norm              # (hidden,)
        self.output = output                        # LoRALinear (vocab, hidden): the LM head
        self.tokenizer = tokenizer
        self.int8_activations = False
        """Inference only: let the fused 4-bit products round activations to int8, as llama.cpp
        does (faster decoding, logits ~5 % of their norm off); see :func:`qlora_np.matmul`."""
        self.compute_dtype = "float32"
        """What training's large products multiply in: see :meth:`set_compute_dtype`."""
        self.projections = FusedProjections()
        self.name_or_path = None
        """The Hugging Face folder it was loaded from (adapters saved for PEFT name it as their base)."""
        self.backend = "kernels"
        self.set_backend(backend)

    # -- loading ------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path, quant_type="nf4", blocksize=64, double_quant=True):
        """Load a Llama GGUF (any tensor type gguf-py decodes); re-quantize linear weights.

        ``quant_type`` "nf4" / "fp4" / "int4" / "int4_asym" re-quantizes every linear weight
        (and the LM head) to 4 bits; None keeps them float32.
        """
        if not os.path.isfile(path):
            raise CheckpointError(f"no GGUF file at {path}")
        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, KeyError, IndexError, TypeError, OSError) as error:
            raise CheckpointError(f"{path} is not a readable GGUF file: {error}") from None
        try:
            config = LlamaConfig.from_gguf(reader, os.fspath(path))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: missing or malformed llama.* metadata: {error}") from None
        tensors = {t.name: t for t in reader.tensors}
        config = _with_rope_factors(config, tensors, path)
        tied = "output.weight" not in tensors
        check_tensors(tensors, gguf_tensor_names(config, tied) + ["rope_freqs.weight"] * bool(config.rope_freq_factors),
                      path)
        check_shapes({name: tuple(reversed(t.shape.tolist())) for name, t in tensors.items()},
                     gguf_tensor_shapes(config, tied), path)
        tokenizer = Tokenizer.from_gguf(reader) if "tokenizer.ggml.tokens" in reader.fields else None
        return cls.from_weights(config, _LazyWeights(tensors, path), quant_type, blocksize,
                                double_quant, tokenizer)

    @classmethod
    def from_hf(cls, folder, quant_type="nf4", blocksize=64, double_quant=True):
        """Load a Hugging Face Llama checkpoint: ``config.json`` + ``model.safetensors`` (or shards).

        HF keeps q and k rows in rotate-half order; they are permuted to the GGUF
        (adjacent-pair) order used here. The tokenizer comes from ``tokenizer.json`` when
        the folder has one (else ``tokenizer`` is None: pass token ids). A folder that
        config.json calls a bitsandbytes checkpoint loads with
        :func:`~qlora_np.models.llama.hf.bnb_model_parts`: its 4-bit weights as stored, whatever ``quant_type``.
        """
        if is_bitsandbytes_folder(folder):
            model = cls(**bnb_model_parts(folder))
        else:
            config = LlamaConfig.from_hf_folder(folder)
            tensors = read_checkpoint_tensors(folder)
            model = cls.from_weights(config, hf_to_gguf_weights(tensors, config, folder), quant_type, blocksize,
                                     double_quant, Tokenizer.from_hf_folder(folder))
        model.name_or_path = os.fspath(folder)
        return model

    @classmethod
    def from_weights(cls, config, weights, quant_type="nf4", blocksize=64, double_quant=True,
                     tokenizer=None):
        """Build from float weights under GGUF names (``blk.N.attn_q.weight`` …, (out, in) arrays)."""
        def linear(weight, bias=None):
            bias = None if bias is None else np.asarray(bias, np.float32)
            if quant_type is None:
                return LoRALinear(np.asarray(weight, np.float32), bias, mode="dense")
            return LoRALinear(quantize(weight, quant_type, blocksize, double_quant), bias, mode="quant")

        blocks = []
        for layer in range(config.num_layers):
            prefix = f"blk.{layer}."
            linears = {name: linear(weights[prefix + name + ".weight"],
                                    weights[prefix + name + ".bias"] if name in config.biases else None)
                       for name in LINEAR_NAMES}
            norms = {name: np.asarray(weights[prefix + name + ".weight"], np.float32)
                     for name in block_norm_names(config)}
            blocks.append(LlamaBlock(linears=linears, **norms))
        embedding = np.asarray(weights["token_embd.weight"], np.float32)
        output_weight = weights["output.weight"] if "output.weight" in weights else embedding   # tied
        return cls(config, embedding, blocks, np.asarray(weights["output_norm.weight"], np.float32),
                   linear(output_weight), tokenizer, tied_output="output.weight" not in weights)

    # -- modes ----------------------------------------------------------------
    def linear_layers(self):
        """Every linear layer: the blocks' (in order) and the LM head."""
        return [layer for block in self.blocks for layer in block.linears.values()] + [self.output]

    def set_compute_dtype(self, compute_dtype):
        """Let every layer's large 4-bit products multiply in "bfloat16" (or "float32", the
        default): see :attr:`qlora_np.nn.lora.LoRALinear.compute_dtype`. Training's attention
        scores, their product with V and the gradients of those two follow, as
        ``torch.autocast`` runs attention in bfloat16 in the QLoRA recipe."""
        name = compute_dtype_name(compute_dtype)
        self.compute_dtype = name
        for layer in self.linear_layers():
            layer.compute_dtype = name

    def set_backend(self, backend):
        """What :meth:`forward` and :meth:`generate` run on; returns the model.

        * ``"kernels"`` (the default): the Numba kernels of :mod:`qlora_np.kernels.portable.llama`
          and the fused 4-bit products (:class:`FusedProjections`).
        * ``"reference"``: the plain NumPy functions of the same names in
          :mod:`qlora_np.models.llama.reference`, which those kernels are tested against. Each
          layer's product decodes its 4-bit W whole with the NumPy reference decoder
          (``dequantize(..., backend="reference")``), then multiplies with NumPy
          (:func:`~qlora_np.models.llama.reference.linear`). ``int8_activations`` does not
          apply, and the layers must be on the CPU. It is slow and meant for checking.

        Training (:mod:`qlora_np.models.llama.lora`) does not look at this setting. Its
        element-wise passes run on the kernels in float32 and on these references in other dtypes.
        """
        if backend not in BACKENDS:
            raise InvalidValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        return self

    def train(self):
        """Training mode: adapters' dropout is on and layers keep what backward needs."""
        for layer in self.linear_layers():
            layer.train()

    def eval(self):
        """Inference mode: no dropout, nothing kept for backward."""
        for layer in self.linear_layers():
            layer.eval()

    # -- forward --------------------------------------------------------------
    def forward(self, ids, cache=None, last_only=False):
        """Logits (T, vocab) for token ids (T,), continuing ``cache`` if given (and extending it)."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ShapeError(f"ids must be a non-empty 1-D integer array, got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InvalidValueError(f"token ids must be in [0, {self.config.vocab_size}), "
                                    f"got {ids.min()}…{ids.max()}")
        start = 0 if cache is None else cache.length
        if cache is not None and start + ids.size > cache.max_len:
            raise InvalidValueError(f"KV cache holds {cache.max_len} positions, needs {start + ids.size}")
        cfg = self.config
        ropes = layer_rope_tables(cfg, np.arange(start, start + ids.size))   # per layer: 2 × (T, hd/2)
        eps = cfg.rms_norm_eps
        steps = self._steps()
        x = self.embedding[ids]                                          # (T, hidden)
        if cfg.embedding_scale != 1.0:
            x = x * np.float32(cfg.embedding_scale)
        for layer, block in enumerate(self.blocks):
            out = self._attention(block, steps.rms_norm(x, block.attn_norm, eps), ropes[layer], start,
                                  cache, layer)
            x = self._residual(x, out, block.attn_post_norm)
            x = self._residual(x, self._mlp(block, steps.rms_norm(x, block.ffn_norm, eps)), block.ffn_post_norm)
        if cache is not None:
            cache.length = start + ids.size
        if last_only:
            x = x[-1:]
        logits, = self._project([self.output], steps.rms_norm(x, self.output_norm, eps))
        return final_logits(cfg, logits)

    def _steps(self):
        """The module whose rms_norm, attend and swiglu :meth:`forward` calls: the kernels or
        their references (the same names)."""
        return reference if self.backend == "reference" else llama_cpu

    def _project(self, layers, x):
        """[layer(x) for layer in layers], x (T, in) float32: the fused products, or with the
        reference backend each layer's :func:`~qlora_np.models.llama.reference.linear`."""
        if self.backend == "reference":
            return [_reference_linear(layer, x) for layer in layers]
        return self.projections(layers, x, self.int8_activations)

    def _residual(self, x, out, post_norm):
        """x + residual_scale · out, out normed first where the block has a post-norm."""
        if post_norm is not None:
            out = self._steps().rms_norm(out, post_norm, self.config.rms_norm_eps)
        if self.config.residual_scale != 1.0:
            out = out * np.float32(self.config.residual_scale)
        return x + out

    def _attention(self, block, n, rope, start, cache, layer):
        """The attention half of a block for inference."""
        cfg = self.config
        T, hd = n.shape[0], cfg.head_dim
        q, k, v = self._project([block.linears[name] for name in ("attn_q", "attn_k", "attn_v")], n)
        if cfg.qk_norm:                                                 # over each head
            q = self._steps().rms_norm(q.reshape(-1, hd), block.attn_q_norm, cfg.rms_norm_eps)
            k = self._steps().rms_norm(k.reshape(-1, hd), block.attn_k_norm, cfg.rms_norm_eps)
        q = q.reshape(T, cfg.num_heads, hd)
        k, v = k.reshape(T, cfg.num_kv_heads, hd), v.reshape(T, cfg.num_kv_heads, hd)
        if cache is None:                                               # attend within these tokens only
            keys = np.empty((cfg.num_kv_heads, T, hd), np.float32)
            values = np.empty_like(keys)
        else:
            keys, values = cache.keys[layer], cache.values[layer]       # (KV, max_len, hd)
        out = self._steps().attend(q, k, v, *rope, keys, values, start, cfg.scale, cfg.window(layer),
                                   cfg.attention_softcap)               # (T, H·hd)
        return self._project([block.linears["attn_output"]], out)[0]

    def _mlp(self, block, m):
        gate, up = self._project([block.linears["ffn_gate"], block.linears["ffn_up"]], m)
        steps = self._steps()
        hidden = steps.swiglu(gate, up) if self.config.activation == "silu" else steps.geglu(gate, up)
        return self._project([block.linears["ffn_down"]], hidden)[0]

    # -- generation -------------------------------------------------------------
    def generate(self, prompt, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                 stop=None, chat=False):
        """Yield the text of each new token (streaming). Greedy when temperature == 0.

        ``prompt`` is text (tokenized with the model's tokenizer; ``chat=True`` wraps it
        as a user turn with the chat template) or a list of token ids. Generation ends at
        an end-of-generation token, after ``max_new_tokens``, or when a ``stop`` string appears.
        """
        tokenizer = self.tokenizer
        if isinstance(prompt, str):
            if chat:
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        rng = np.random.default_rng(seed)
        cache = KVCache(self.config, min(self.config.context_length, len(ids) + max_new_tokens))
        logits = self.forward(np.array(ids), cache, last_only=True)[0]
        produced, text = [], ""
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, rng)
            if tokenizer is not None and token in tokenizer.end_ids:
                return
            produced.append(token)
            if tokenizer is None:
                yield token
            else:
                full = tokenizer.decode(produced)
                if full.endswith("\ufffd"):                               # an unfinished UTF-8 sequence
                    continue
                piece, text = full[len(text):], full
                if stop and any(s in text for s in ([stop] if isinstance(stop, str) else stop)):
                    return
                yield piece
            if cache.length >= cache.max_len:
                return
            logits = self.forward(np.array([token]), cache, last_only=True)[0]


def _with_rope_factors(config, tensors, path):
    """``config`` with the RoPE frequency factors of the GGUF's ``rope_freqs.weight`` (Llama 3.x
    GGUFs carry their rope scaling so), when it has one."""
    tensor = tensors.get("rope_freqs.weight")
    if tensor is None:
        return config
    check_shapes({"rope_freqs.weight": tuple(reversed(tensor.shape.tolist()))},
                 {"rope_freqs.weight": (config.head_dim // 2,)}, path)
    factors = decode_tensor(tensor)                                             # (hd/2,)
    if not np.all(np.isfinite(factors) & (factors > 0)):
        raise CheckpointError(f"{path}: rope_freqs.weight must hold positive numbers, got {factors}")
    return replace(config, rope_freq_factors=tuple(float(factor) for factor in factors))


class _LazyWeights:
    """name → float32 array, decoded from a GGUF file when first asked for."""

    def __init__(self, tensors, path):
        self._tensors, self._path = tensors, path

    def __contains__(self, name):
        return name in self._tensors

    def __getitem__(self, name):
        if name not in self._tensors:
            raise ShapeError(f"{self._path}: tensor {name!r} is missing")
        return decode_tensor(self._tensors[name])


# ---------------------------------------------------------------------------
# The inference products, the RoPE tables and sampling
# ---------------------------------------------------------------------------

class FusedProjections:
    """Inference products of a model's layers, each group of layers with one input (q, k and v;
    gate and up; o; down; the head) as one prepared fused product (see
    :class:`qlora_np.kernels.products.FusedProduct`): per token, only the kernel call is left.

    A group is prepared again when a layer's weight is replaced (its packed array is the key);
    layers with LoRA, a bias or more rows than the fused kernels take run ``layer.forward``.
    """

    def __init__(self):
        self._prepared = {}

    def __call__(self, layers, x, int8_activations=False):
        """[layer(x) for layer in layers] for x (T, in) float32: (T, out) arrays."""
        key = [x.shape[0] <= FUSED_MAX_ROWS, int8_activations]
        for layer in layers:
            if layer.mode != "quant" or layer.bias is not None:
                return [layer.forward(x, cache=False) for layer in layers]
            key.append(id(layer.base.packed))
        key = tuple(key)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepare(layers, x.shape[0], int8_activations)
            self._prepared[key] = prepared
        if not prepared:
            return [layer.forward(x, cache=False) for layer in layers]
        product, columns = prepared
        y = product(x)
        return [y[:, start:stop] for start, stop in columns]

    @staticmethod
    def _prepare(layers, rows, int8_activations):
        """(product, each layer's columns of its result) or () if not fusable. The product holds
        the packed arrays, so their ids (the key) cannot be reused while it is kept."""
        bases = [layer.base for layer in layers]
        if not fuse_together(rows, bases, int8_activations):
            return ()
        product = fused_product(bases, int8_activations)
        ends = np.cumsum(product.out_features).tolist()
        return product, list(zip([0] + ends[:-1], ends))


def layer_rope_tables(config, positions):
    """RoPE's cos and sin (T, hd/2) for each layer at ``positions`` (T,): the tables of its base,
    each base computed once; a layer without RoPE gets cos 1 and sin 0, which rotate by nothing
    exactly."""
    tables = {}
    for layer in range(config.num_layers):
        theta = config.theta(layer)
        if theta not in tables:
            tables[theta] = rope_tables(positions, config.head_dim, theta, config.rope_freq_factors) if theta \
                else (np.ones((len(positions), config.head_dim // 2), np.float32),
                      np.zeros((len(positions), config.head_dim // 2), np.float32))
    return [tables[config.theta(layer)] for layer in range(config.num_layers)]


def final_logits(config, logits):
    """The LM head's output made the model's logits: times logit_scale (Granite), then
    soft-capped (Gemma 2): cap · tanh(logits / cap)."""
    if config.logit_scale != 1.0:
        logits = logits * np.float32(config.logit_scale)
    if config.final_softcap:
        cap = np.float32(config.final_softcap)
        logits = cap * np.tanh(logits / cap)
    return logits


def rope_tables(positions, head_dim, theta, factors=()):
    """cos and sin (T, head_dim/2) of pos · theta^(-2i/head_dim) / factors[i] (``factors``: a
    config's ``rope_freq_factors``, none for plain RoPE). In float32 throughout, as transformers
    and llama.cpp compute them: at a thousand positions float64 angles differ from theirs by
    up to 1e-4 rad, enough to show in a model's logits."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    frequencies = np.float32(1) / np.float32(theta) ** exponents                       # (hd/2,)
    if len(factors):
        frequencies = frequencies / np.asarray(factors, np.float32)
    angles = np.asarray(positions, np.float32)[:, None] * frequencies[None, :]          # (T, hd/2)
    return np.cos(angles), np.sin(angles)


def _reference_linear(layer, x):
    """layer(x) in eval mode on the references: W decoded whole by the NumPy reference
    decoder if 4-bit, then :func:`qlora_np.models.llama.reference.linear`."""
    if layer.device != "cpu":
        raise DeviceError("the reference backend runs on the CPU: call layer.to('cpu') first")
    weight = layer.base
    if isinstance(weight, QuantizedTensor):
        weight = dequantize(weight, dtype="float32", backend="reference")       # (out, in)
    adapters = layer.has_adapters and not layer.merged
    if not adapters:
        return reference.linear(x, weight, layer.bias)
    return reference.linear(x, weight, layer.bias, layer.lora_a, layer.lora_b, layer.scale)


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, rng=None):
    """Next token id from logits (vocab,): argmax at temperature 0, else softmax sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if top_p < 1.0:
        keep = np.searchsorted(np.cumsum(probs), top_p) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    rng = np.random.default_rng() if rng is None else rng
    return int(order[rng.choice(len(order), p=probs)])
