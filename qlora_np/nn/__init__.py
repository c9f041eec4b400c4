"""Layers and optimisers: :class:`~qlora_np.nn.lora.LoRALinear` (a frozen weight plus trainable
low-rank adapters, forward and backward by hand) and :mod:`~qlora_np.nn.optim` (AdamW, schedules,
clipping)."""
