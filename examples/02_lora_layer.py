"""Train QLoRA adapters on a frozen 4-bit MLP, by hand, and see where the memory goes.

A 256 → 512 → 10 MLP whose two weights are frozen in NF4 (double quant, blocksize
64) learns a 10-class task through rank-8 adapters only (alpha 8), with AdamW and a
softmax cross-entropy written out below. Then: parameter counts, bytes per part,
the savings against fp16, and the same comparison for 7B / 13B / 70B models.

Run:  python examples/02_lora_layer.py
"""

import numpy as np

from qlora_np import LoRALinear
from qlora_np.train import memory
from qlora_np.nn.optim import AdamW, LRScheduler, clip_grad_norm, warmup_cosine_schedule

rng = np.random.default_rng(0)
CLASSES, IN, HIDDEN = 10, 256, 512

# ---------------------------------------------------------------------------
# 1. A synthetic task: 10 Gaussian clusters in 256 dimensions (noise std 3 around each centre)
# ---------------------------------------------------------------------------
centres = rng.normal(0, 1, (CLASSES, IN)).astype(np.float32)


def sample(n):
    labels = rng.integers(0, CLASSES, n)
    points = centres[labels] + rng.normal(0, 3.0, (n, IN)).astype(np.float32)
    return points.astype(np.float32), labels


x_train, y_train = sample(4000)
x_test, y_test = sample(2000)

# ---------------------------------------------------------------------------
# 2. The model: random frozen base weights in NF4, trainable rank-8 adapters
# ---------------------------------------------------------------------------
def frozen_weight(out_features, in_features):
    return rng.normal(0, np.sqrt(2 / in_features), (out_features, in_features)).astype(np.float32)


settings = dict(r=8, alpha=8, mode="qlora", quant_type="nf4", blocksize=64, double_quant=True)
layer1 = LoRALinear.from_weight(frozen_weight(HIDDEN, IN), bias=np.zeros(HIDDEN), seed=1, **settings)
layer2 = LoRALinear.from_weight(frozen_weight(CLASSES, HIDDEN), bias=np.zeros(CLASSES), seed=2, **settings)
layers = [layer1, layer2]
params = {f"layer{i}.{name}": param for i, layer in enumerate(layers, 1)
          for name, param in layer.parameters().items()}


def forward(x):
    pre = layer1(x)                                         # (batch, 512)
    return pre, layer2(np.maximum(pre, 0))                  # (batch, 10) logits


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)               # (batch, 10)
    loss = -np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()
    grad = probs
    grad[np.arange(len(labels)), labels] -= 1
    return loss, grad / len(labels)


def accuracy(x, labels):
    for layer in layers:
        layer.eval()
    logits = forward(x)[1]
    for layer in layers:
        layer.train()
    return float(np.mean(logits.argmax(axis=1) == labels))


# ---------------------------------------------------------------------------
# 3. Training: forward, hand-written backward, clip, AdamW step
# ---------------------------------------------------------------------------
EPOCHS, BATCH = 8, 100
steps = EPOCHS * len(x_train) // BATCH
optimizer = AdamW(params, lr=3e-3, weight_decay=0.01)
scheduler = LRScheduler(optimizer, warmup_cosine_schedule(3e-3, warmup_steps=20, total_steps=steps))
before = accuracy(x_test, y_test)
for epoch in range(EPOCHS):
    order = rng.permutation(len(x_train))
    losses = []
    for start in range(0, len(order), BATCH):
        batch = order[start:start + BATCH]
        pre, logits = forward(x_train[batch])
        loss, grad_logits = cross_entropy(logits, y_train[batch])
        grad_hidden = layer2.backward(grad_logits) * (pre > 0)     # through the ReLU
        layer1.backward(grad_hidden)
        clip_grad_norm(params, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss)
    print(f"epoch {epoch + 1}: loss {np.mean(losses):.3f}")
after = accuracy(x_test, y_test)
print(f"\ntest accuracy: {before:.1%} before training → {after:.1%} after (chance: {1 / CLASSES:.0%})")
assert after > 0.6 and after > before + 0.3, "the adapters did not learn the task"

# ---------------------------------------------------------------------------
# 4. Memory: what each part of this model takes, and what other set-ups would take
# ---------------------------------------------------------------------------
print("\nparameters:")
for name, layer in (("layer1", layer1), ("layer2", layer2)):
    print(f"  {name}: {layer.total_parameters():,} in all, {layer.trainable_parameters():,} trainable "
          f"({layer.trainable_parameters() / layer.total_parameters():.2%})")
reports = [layer.memory_report() for layer in layers]
parts = {key: sum(report[key] for report in reports) for key in reports[0]}
print("\nbytes per part (both layers):")
for key, value in parts.items():
    print(f"  {key:16} {value:>9,}")
linear_values = sum(layer.out_features * layer.in_features for layer in layers)
fp16_base = 2 * linear_values
print(f"\nfrozen base: {parts['base_weight'] + parts['quant_constants']:,} bytes in NF4+dq vs "
      f"{fp16_base:,} in fp16 ({fp16_base / (parts['base_weight'] + parts['quant_constants']):.2f}× smaller)")

# the same four set-ups as for the LLaMA models below, from the formulas of qlora_np.train.memory:
# the linear weights are what QLoRA quantizes, the biases stay 16-bit
bias_values = sum(layer.bias.size for layer in layers)
adapter_values = sum(layer.trainable_parameters() for layer in layers)
mlp_setups = memory.setup_totals(memory.setup_bytes(linear_values, bias_values, adapter_values), unit=1024)
measured = parts["total"] / 1024
print(f"\nthis MLP, training memory (KiB; QLoRA measured from the arrays: {measured:,.2f} KiB,"
      f" with float32 biases):")
print(memory.format_bar_chart(mlp_setups, unit="KiB"))
assert abs(mlp_setups["QLoRA (NF4 base)"] - measured) < 0.02 * measured, "formula and arrays disagree"
qlora_kib = mlp_setups["QLoRA (NF4 base)"]
print(f"QLoRA needs {mlp_setups['full fp16 mixed'] / qlora_kib:.1f}× less than full fp16 mixed-precision "
      f"fine-tuning, {mlp_setups['LoRA (fp16 base)'] / qlora_kib:.1f}× less than LoRA on an fp16 base")
print()
print(memory.setup_bar_chart(memory.LLAMA_SHAPES["7B"], r=8))
print()
print(memory.format_scaling_table(r=8))
