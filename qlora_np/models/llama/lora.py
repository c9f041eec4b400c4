"""LoRA training through a whole Llama model: inject adapters, forward with saved activations, backward.

Only the adapters (and nothing else) get gradients; the frozen 4-bit weights pass the
gradient on with the transposed product. Every step of the backward pass is written
out below, in the reverse order of the forward:

    x ← E[ids]
    per block:  n = RMSNorm(x)·g1;  q, k, v = Wq n, Wk n, Wv n;  q, k = RoPE(q), RoPE(k)
                o = softmax(q kᵀ/√d + causal) v;  x ← x + Wo o
                m = RMSNorm(x)·g2;  x ← x + Wdown(silu(Wgate m) ⊙ Wup m)
    logits = Wout (RMSNorm(x)·g_out);   loss = mean cross-entropy over labels ≠ ignore_index

The switches of the related architectures (:mod:`qlora_np.models.llama.architectures`) each
add their step and its gradient: q/k norms before RoPE, a window in the mask, soft-capped
scores (chunked attention) and logits, post-norms and residual scales around each sublayer,
GeGLU for SwiGLU. Biases are frozen: they only shift the layers' outputs.
"""

from functools import partial
from typing import Callable, NamedTuple

import numpy as np

from qlora_np.errors import InvalidValueError, ShapeError, UnknownFormatError
from qlora_np.kernels import attention_bf16, bf16
from qlora_np.kernels.portable import training as training_cpu
from qlora_np.models.llama.names import LINEAR_NAMES
from qlora_np.models.llama import reference
from qlora_np.models.llama.model import layer_rope_tables
from qlora_np.nn.lora import LoRALinear, init_adapters
from qlora_np.quant.tensor import QuantizedTensor

IGNORE_INDEX = -100

HF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
"""PEFT / Hugging Face module names → the GGUF names used here."""


def inject_lora(model, target_modules=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0,
                use_rslora=False, init="kaiming", seed=0, dtype=np.float32):
    """Give the named linear layers of every block trainable adapters (B = 0: outputs unchanged).

    ``target_modules`` takes Hugging Face names (``q_proj`` … ``down_proj``), GGUF names
    (``attn_q`` … ``ffn_down``) or "all-linear". Returns the model's trainable parameters.
    """
    names = _resolve_targets(target_modules)
    rng = np.random.default_rng(seed)
    for block in model.blocks:
        for name in names:
            layer = block.linears[name]
            if layer.has_adapters:
                raise InvalidValueError(f"{name} already has adapters")
            base = layer.base
            mode = "qlora" if isinstance(base, QuantizedTensor) else "lora"
            lora_a, lora_b = init_adapters(rng, r, layer.in_features, layer.out_features, init, dtype)
            block.linears[name] = LoRALinear(base, layer.bias, lora_a, lora_b, alpha, dropout, mode,
                                             use_rslora, seed=int(rng.integers(2**31)))
    return trainable_parameters(model)


def _resolve_targets(target_modules):
    if target_modules == "all-linear":
        return list(LINEAR_NAMES)
    names = []
    for target in target_modules:
        name = HF_NAMES.get(target, target)
        if name not in LINEAR_NAMES:
            raise UnknownFormatError(f"unknown target module {target!r}; use {sorted(HF_NAMES)} "
                                     f"or {list(LINEAR_NAMES)}")
        names.append(name)
    return names


def trainable_parameters(model):
    """``blk.N.<name>.lora_a`` / ``.lora_b`` → Parameter, for the optimizer."""
    params = {}
    for index, block in enumerate(model.blocks):
        for name, layer in block.linears.items():
            for key, param in layer.parameters().items():
                params[f"blk.{index}.{name}.{key}"] = param
    return params


def print_trainable_parameters(model, out=print):
    """One line as PEFT prints it: trainable, all, and the trainable share; returns both counts."""
    trainable = sum(p.value.size for p in trainable_parameters(model).values())
    total = model.embedding.size + model.output_norm.size
    for block in model.blocks:
        total += block.attn_norm.size + block.ffn_norm.size
        total += sum(layer.total_parameters() for layer in block.linears.values())
    if not model.tied_output:
        total += model.output.total_parameters()
    out(f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}")
    return trainable, total


# ---------------------------------------------------------------------------
# Training forward and backward
# ---------------------------------------------------------------------------

def loss_and_backward(model, ids, labels, dtype=np.float32, checkpoint=False, positions=None,
                      segments=None, normalizer=None):
    """Mean cross-entropy of ``model`` on ids (B, T) predicting labels (B, T), and its gradients.

    labels[b, t] is the token expected after ids[b, :t+1] (IGNORE_INDEX to skip). The
    adapters' ``grad`` fields accumulate the gradient. Returns the loss (float).

    ``positions`` (B, T) are the RoPE positions (default 0 … T-1 in every row) and
    ``segments`` (B, T) split rows into documents that do not attend to each other
    (packing: several examples in one row, each starting again at position 0).
    ``normalizer`` divides the summed token losses (default: this batch's label
    count); gradient accumulation passes the label count of all its micro-batches so
    that the accumulated gradient is the gradient of one mean over all of them.
    ``checkpoint=True`` keeps only each block's input and recomputes the block's
    activations during the backward pass (gradient checkpointing: less memory, one
    more forward); dropout masks are replayed so the gradients are the same.
    """
    ids, labels, positions, segments, count = _checked_batch(model, ids, labels, positions, segments)
    if count == 0:
        raise InvalidValueError("no label differs from ignore_index: nothing to learn from")
    context = _context(model, positions, segments, dtype, ids.shape[1])
    saved, final = _forward(model, ids, context, dtype, checkpoint)
    rows = np.flatnonzero(labels.reshape(-1) != IGNORE_INDEX)      # only labelled rows need logits
    logits = model.output.forward(final.reshape(ids.size, -1)[rows], cache=True)   # (count, vocab)
    logits, slope = _final_logits(model.config, logits)
    loss, grad_logits = _passes(logits.dtype).cross_entropy(logits, labels.reshape(-1)[rows],
                                                            count if normalizer is None else normalizer)
    if slope is not None:
        grad_logits *= slope
    grad_final = np.zeros((ids.size, final.shape[-1]), final.dtype)
    grad_final[rows] = model.output.backward(grad_logits)
    _backward(model, saved, grad_final.reshape(final.shape), context)
    return loss


def summed_loss(model, ids, labels, positions=None, segments=None, dtype=np.float32):
    """(sum of the token losses, label count) for a batch, forward only (for evaluation).

    Runs the same batched forward as training; call ``model.eval()`` first to turn
    dropout off.
    """
    ids, labels, positions, segments, count = _checked_batch(model, ids, labels, positions, segments)
    if count == 0:
        return 0.0, 0
    _, final = _forward(model, ids, _context(model, positions, segments, dtype, ids.shape[1]), dtype, False)
    rows = np.flatnonzero(labels.reshape(-1) != IGNORE_INDEX)
    logits, _ = _final_logits(model.config, model.output.forward(final.reshape(ids.size, -1)[rows], cache=False))
    loss, _ = _passes(logits.dtype).cross_entropy(logits, labels.reshape(-1)[rows], 1)
    return loss, count


def _checked_batch(model, ids, labels, positions, segments):
    """Arrays of one batch, shapes and token ids checked; default positions 0 … T-1; and the label count."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    if ids.ndim != 2 or ids.shape != labels.shape:
        raise ShapeError(f"ids and labels must both be (batch, seq), got {ids.shape} and {labels.shape}")
    vocab = model.config.vocab_size
    for name, array, allowed in (("ids", ids, ()), ("labels", labels, (IGNORE_INDEX,))):
        if array.dtype.kind not in "iu":
            raise InvalidValueError(f"{name} must be integer token ids, got dtype {array.dtype}")
        bad = ((array < 0) | (array >= vocab)) & ~np.isin(array, allowed)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InvalidValueError(f"{name}{list(at)} = {array[at]} is not a token id of this model "
                                    f"(0 … {vocab - 1}{', or ignore_index' if allowed else ''})")
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape) if positions is None else positions
    for name, array in (("positions", positions), ("segments", segments)):
        if array is not None and np.shape(array) != ids.shape:
            raise ShapeError(f"{name} must have the shape of ids {ids.shape}, got {np.shape(array)}")
    return ids, labels, np.asarray(positions), segments, int(np.count_nonzero(labels != IGNORE_INDEX))


class _Context(NamedTuple):
    """What every block of a step reads besides its input: per layer the RoPE tables
    (batch·seq, hd/2) ×2 and the attention mask (B or 1, T, T), and the attention passes."""
    ropes: list
    masks: list
    attention: "_AttentionPasses"


def _context(model, positions, segments, dtype, seq):
    cfg = model.config
    ropes = [(cos.astype(dtype), sin.astype(dtype))
             for cos, sin in layer_rope_tables(cfg, np.asarray(positions).reshape(-1))]
    masks = {window: _attention_mask(seq, segments, window) for window in set(map(cfg.window, range(cfg.num_layers)))}
    return _Context(ropes, [masks[cfg.window(layer)] for layer in range(cfg.num_layers)],
                    _attention_passes(model, dtype, seq))


def _forward(model, ids, context, dtype, checkpoint):
    """Blocks and final norm in training mode: (what the backward needs, normed output (B, T, hidden))."""
    cfg = model.config
    x = model.embedding[ids].astype(dtype)                                 # (B, T, hidden)
    if cfg.embedding_scale != 1.0:
        x *= dtype(cfg.embedding_scale)
    saved = []
    for layer, block in enumerate(model.blocks):
        if checkpoint:                   # remember the input and the dropout generators only
            states = {name: layer.dropout_rng.bit_generator.state for name, layer in block.linears.items()}
            step = {"x": x, "rng_states": states}
            x, _ = _block_forward(cfg, block, layer, x, context)
        else:
            x, step = _block_forward(cfg, block, layer, x, context)
        saved.append(step)
    final, rms = _passes(dtype).rms_norm_forward(x, model.output_norm, cfg.rms_norm_eps)
    saved.append({"x": x, "rms": rms})
    return saved, final


def _final_logits(cfg, logits):
    """(the model's logits, what their gradient is multiplied by on the way back, or None):
    :func:`~qlora_np.models.llama.model.final_logits` with its derivative, logit_scale ·
    (1 − tanh²) under a soft-cap."""
    if cfg.logit_scale == 1.0 and not cfg.final_softcap:
        return logits, None
    scale = logits.dtype.type(cfg.logit_scale)
    logits = logits * scale
    if not cfg.final_softcap:
        return logits, scale
    cap = logits.dtype.type(cfg.final_softcap)
    tanh = np.tanh(logits / cap)
    return cap * tanh, (1 - tanh * tanh) * scale


def _attention_mask(seq, segments, window=0):
    """Which keys each query may see: causal (1, T, T), or (B, T, T) causal within its segment;
    with a ``window``, only the keys less than that many positions back."""
    causal = np.tril(np.ones((seq, seq), bool))
    if window:
        causal &= np.triu(np.ones((seq, seq), bool), 1 - window)
    if segments is None:
        return causal[None]
    segments = np.asarray(segments)
    same = segments[:, :, None] == segments[:, None, :]                    # (B, T, T)
    return same & causal


def _block_forward(cfg, block, layer, x, context):
    """One block in training mode: (output, what its backward needs); the layers cache their inputs."""
    B, T, _ = x.shape
    lin, passes, eps = block.linears, _passes(x.dtype), cfg.rms_norm_eps
    rope = context.ropes[layer]
    step = {"x": x}
    n, step["rms1"] = passes.rms_norm_forward(x, block.attn_norm, eps)
    q = _train(lin["attn_q"], n).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = _train(lin["attn_k"], n).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = _train(lin["attn_v"], n)
    if cfg.qk_norm:                                                               # over each head
        step.update(q_raw=q, k_raw=k)
        q, step["rms_q"] = passes.rms_norm_forward(q, block.attn_q_norm, eps)
        k, step["rms_k"] = passes.rms_norm_forward(k, block.attn_k_norm, eps)
    q = passes.rope_into_groups(q, *rope, cfg.num_kv_heads)                       # (B, KV, T·g, hd)
    k = passes.rope_into_groups(k, *rope, cfg.num_kv_heads)                       # (B, KV, T, hd)
    v = _heads_to_groups(v, cfg.num_kv_heads, cfg.head_dim)                       # (B, KV, T, hd)
    out, step["lse"] = context.attention.forward(q, k, v, context.masks[layer])  # (B, KV, T·g, hd)
    step.update(q=q, k=k, v=v)
    x = x + _sublayer_out(cfg, step, "attn", _train(lin["attn_output"], _groups_to_heads(out, T)),
                          block.attn_post_norm)
    step["x_mid"] = x
    m, step["rms2"] = passes.rms_norm_forward(x, block.ffn_norm, eps)
    gate, up = _train(lin["ffn_gate"], m), _train(lin["ffn_up"], m)
    step.update(gate=gate, up=up)
    hidden = _gated(cfg, passes)(gate, up)   # not kept (its pairs may be): backward makes it again if needed
    down = _train(lin["ffn_down"], hidden, keep_input=False)
    return x + _sublayer_out(cfg, step, "ffn", down, block.ffn_post_norm), step


def _sublayer_out(cfg, step, name, out, post_norm):
    """What attention's or the MLP's output ``out`` adds to the residual: normed first where
    the block has a post-norm (its input and inverse RMS kept in ``step``), times residual_scale."""
    if post_norm is not None:
        step[name + "_out"] = out
        out, step[name + "_rms"] = _passes(out.dtype).rms_norm_forward(out, post_norm, cfg.rms_norm_eps)
    return out * out.dtype.type(cfg.residual_scale) if cfg.residual_scale != 1.0 else out


def _sublayer_grad(cfg, step, name, grad, post_norm):
    """The gradient of a sublayer's output from the residual's: the backward of :func:`_sublayer_out`."""
    if cfg.residual_scale != 1.0:
        grad = grad * grad.dtype.type(cfg.residual_scale)
    if post_norm is None:
        return grad
    return _passes(grad.dtype).add_rms_norm_backward(np.zeros_like(grad), step[name + "_out"], step[name + "_rms"],
                                                     post_norm, grad)


def _gated(cfg, passes):
    """The gated MLP's forward: silu(gate)·up (SwiGLU) or gelu_tanh(gate)·up (GeGLU)."""
    return passes.swiglu if cfg.activation == "silu" else passes.geglu


def _backward(model, saved, grad_final, context):
    cfg = model.config
    last = saved[-1]
    passes = _passes(grad_final.dtype)
    grad = passes.add_rms_norm_backward(np.zeros_like(grad_final), last["x"], last["rms"], model.output_norm,
                                        grad_final)
    B, T, _ = grad.shape
    for layer in reversed(range(len(model.blocks))):
        block, step = model.blocks[layer], saved[layer]
        lin, rope, mask = block.linears, context.ropes[layer], context.masks[layer]
        if "rng_states" in step:         # checkpointed: recompute the block, same dropout masks
            for name, linear in lin.items():
                linear.dropout_rng.bit_generator.state = step["rng_states"][name]
            _, step = _block_forward(cfg, block, layer, step["x"], context)
        # MLP: x_out = x_mid + post(Wdown(act(gate) ⊙ up))
        down = lin["ffn_down"]
        hidden = _gated(cfg, passes)(step["gate"], step["up"]) if down.needs_input_again() else None
        grad_hidden = down.backward(_sublayer_grad(cfg, step, "ffn", grad, block.ffn_post_norm), x=hidden)
        backward = passes.swiglu_backward if cfg.activation == "silu" else passes.geglu_backward
        grad_gate, grad_up = backward(grad_hidden, step["gate"], step["up"])
        grad_m = lin["ffn_gate"].backward(grad_gate)
        grad_m += lin["ffn_up"].backward(grad_up)
        passes.add_rms_norm_backward(grad, step["x_mid"], step["rms2"], block.ffn_norm, grad_m)
        # attention: x_mid = x + post(Wo o)
        grad_o = lin["attn_output"].backward(_sublayer_grad(cfg, step, "attn", grad, block.attn_post_norm))
        grad_o = _heads_to_groups(grad_o, cfg.num_kv_heads, cfg.head_dim)
        grad_q, grad_k, grad_v = context.attention.backward(step["q"], step["k"], step["v"], mask, step["lse"],
                                                            grad_o)
        grad_q = passes.rope_back_from_groups(grad_q, *rope)                          # (B, T, H, hd)
        grad_k = passes.rope_back_from_groups(grad_k, *rope)                          # (B, T, KV, hd)
        if cfg.qk_norm:
            grad_q = passes.add_rms_norm_backward(np.zeros_like(grad_q), step["q_raw"], step["rms_q"],
                                                  block.attn_q_norm, grad_q)
            grad_k = passes.add_rms_norm_backward(np.zeros_like(grad_k), step["k_raw"], step["rms_k"],
                                                  block.attn_k_norm, grad_k)
        grad_n = lin["attn_q"].backward(grad_q.reshape(B, T, -1))
        grad_n += lin["attn_k"].backward(grad_k.reshape(B, T, -1))
        grad_n += lin["attn_v"].backward(_groups_to_heads(grad_v, T))
        passes.add_rms_norm_backward(grad, step["x"], step["rms1"], block.attn_norm, grad_n)


def _train(layer, x, keep_input=True):
    """Forward through a linear layer, saving what its backward needs when training
    (without x itself when not ``keep_input``: see :meth:`LoRALinear.forward`)."""
    return layer.forward(x, keep_input=keep_input).astype(x.dtype, copy=False)


ATTENTION_CHUNK = 128
"""Query positions per attention chunk. A chunk's queries see no key after its last
position, so its products stop there: over 256 positions the attention products do
3/4 of the work of the full square (smaller chunks save more work, but the smaller
products ran no faster here)."""


def _heads_to_groups(x, kv_heads, head_dim):
    """(B, T, H·hd) → (B, KV, T·g, hd): row t·g + j of group k is head k·g + j at position t."""
    B, T, _ = x.shape
    grouped = x.reshape(B, T, kv_heads, -1).transpose(0, 2, 1, 3)                 # (B, KV, T, g·hd)
    return np.ascontiguousarray(grouped).reshape(B, kv_heads, -1, head_dim)


def _groups_to_heads(x, T):
    """(B, KV, T·g, hd) → (B, T, H·hd): the inverse of :func:`_heads_to_groups`."""
    B, kv_heads = x.shape[:2]
    return x.reshape(B, kv_heads, T, -1).transpose(0, 2, 1, 3).reshape(B, T, -1)


class _AttentionPasses(NamedTuple):
    """How a step computes attention: ``forward(q, k, v, mask)`` → (out, each query row's
    log-sum-exp); ``backward(q, k, v, mask, lse, grad_out)`` → (grad_q, grad_k, grad_v)."""
    forward: Callable
    backward: Callable


def _attention_passes(model, dtype, seq):
    """The fused bfloat16 kernels (:mod:`qlora_np.kernels.attention_bf16`) for a float32 step of a
    model set to compute in bfloat16, where they apply (no soft-capped scores) and ``seq`` is at
    most their FASTER_UP_TO positions; else the chunked attention below,
    with bfloat16 products (:func:`qlora_np.kernels.bf16.batched_matmul_bf16`) for such a model,
    NumPy's otherwise. Both keep only the log-sum-exp between the passes."""
    cfg = model.config
    bfloat16 = dtype == np.float32 and model.compute_dtype == "bfloat16"
    if bfloat16 and attention_bf16.fuses(cfg.head_dim) and seq <= attention_bf16.FASTER_UP_TO \
            and not cfg.attention_softcap:
        return _AttentionPasses(partial(attention_bf16.attention_bf16, scale=cfg.scale),
                                partial(attention_bf16.attention_bf16_backward, scale=cfg.scale))
    product = bf16.batched_matmul_bf16 if bfloat16 else np.matmul
    options = dict(product=product, scale=cfg.scale, softcap=cfg.attention_softcap)
    return _AttentionPasses(partial(_attention, **options), partial(_attention_backward, **options))


def _attention(q, k, v, mask, product=np.matmul, scale=None, softcap=0.0):
    """Masked grouped-query attention: q (B, KV, T·g, d), k/v (B, KV, T, d) → output like q,
    and each query row's log-sum-exp (B, KV, T·g), all that the backward keeps. Scores are
    q·k times ``scale`` (default 1/√d), then with a ``softcap`` softcap · tanh(score / softcap).

    q comes in :func:`_heads_to_groups` order: the g query heads that read kv head k
    are stacked in group k, position by position, so one product per kv head serves
    them all, with no copies of k and v per query head, and rows [t0·g, t1·g) are the
    queries of positions t0 … t1-1. Queries go in chunks of ATTENTION_CHUNK positions,
    each against the keys up to its last position (the mask is causal); a chunk's
    scores, which the softmax turns into probabilities in place, are the largest
    array here and live only until its product with v.
    """
    rows, d = q.shape[2:]
    T = k.shape[2]
    group = rows // T
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.empty_like(q)
    lse = np.empty(q.shape[:3], q.dtype)
    for start in range(0, T, ATTENTION_CHUNK):
        end = min(start + ATTENTION_CHUNK, T)
        queries = slice(start * group, end * group)
        scores = product(q[:, :, queries], k[:, :, :end].transpose(0, 1, 3, 2))    # (B, KV, c·g, end)
        chunk_scale = scale
        if softcap:
            scores, _ = _softcapped(scores, scale, softcap)
            chunk_scale = 1.0
        lse[:, :, queries] = _passes(q.dtype).masked_softmax(scores, mask[:, start:end, :end], chunk_scale)
        product(scores, v[:, :, :end], out=out[:, :, queries])
    return out, lse


def _attention_backward(q, k, v, mask, lse, grad_out, product=np.matmul, scale=None, softcap=0.0):
    """Gradients of q, k, v for out = softmax(q kᵀ/√d + mask) v, grouped and chunked as
    :func:`_attention` does; grad_out (B, KV, T·g, d) like out, lse what it returned.

    Each chunk makes its scores again and from them and lse its probabilities (an exp
    a score, instead of keeping (queries × keys) floats a layer). With each group's
    queries stacked, the products for k and v sum over the group's query heads by
    themselves (a kv head shared by g query heads gets the sum of their gradients), and
    over the chunks by adding up. ``product`` makes the scores, dP and dQ; dV and dK,
    whose products have a chunk's queries as their short side, stay NumPy's float32
    (bfloat16 panels of such a product cost more to pack than they save).
    """
    rows, d = q.shape[2:]
    T = k.shape[2]
    group = rows // T
    scale = 1 / np.sqrt(d) if scale is None else scale
    grad_q, grad_k, grad_v = np.empty_like(q), np.zeros_like(k), np.zeros_like(v)
    for start in range(0, T, ATTENTION_CHUNK):
        end = min(start + ATTENTION_CHUNK, T)
        queries = slice(start * group, end * group)
        grad_chunk = grad_out[:, :, queries]                                          # (B, KV, c·g, d)
        scores = product(q[:, :, queries], k[:, :, :end].transpose(0, 1, 3, 2))      # (B, KV, c·g, end)
        grad_probs = product(grad_chunk, v[:, :, :end].transpose(0, 1, 3, 2))        # dP (B, KV, c·g, end)
        slope, chunk_scale = None, scale
        if softcap:
            scores, slope = _softcapped(scores, scale, softcap)
            chunk_scale = 1.0
        probs, grad_scores = _passes(q.dtype).masked_softmax_backward(
            grad_probs, scores, mask[:, start:end, :end], lse[:, :, queries], chunk_scale)
        if slope is not None:
            grad_scores *= slope
        grad_v[:, :, :end] += probs.transpose(0, 1, 3, 2) @ grad_chunk
        product(grad_scores, k[:, :, :end], out=grad_q[:, :, queries])
        grad_k[:, :, :end] += grad_scores.transpose(0, 1, 3, 2) @ q[:, :, queries]
    return grad_q, grad_k, grad_v


def _softcapped(scores, scale, softcap):
    """(softcap · tanh(scale · scores / softcap), its derivative by the raw scores)."""
    tanh = np.tanh(scores * scores.dtype.type(scale / softcap))
    return scores.dtype.type(softcap) * tanh, (1 - tanh * tanh) * scores.dtype.type(scale)


def _passes(dtype):
    """Where a step's element-wise passes come from: the Numba kernels of
    :mod:`qlora_np.kernels.portable.training` for float32, their NumPy references of the same
    names in :mod:`qlora_np.models.llama.reference` (same results up to float32 rounding) for
    other dtypes."""
    return training_cpu if dtype == np.float32 else reference
