"""The Llama architecture: ``config`` (its shape) → ``names`` (GGUF ↔ Hugging Face names) →
``hf`` (reading HF folders) → ``model`` (inference with a KV cache) → ``lora`` (training: saved
activations and the backward pass) → ``adapters`` (a model's adapters as plain arrays)."""
