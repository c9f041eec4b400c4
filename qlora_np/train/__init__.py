"""Fine-tuning: ``data`` (records → tokens with a loss mask → batches), ``datasets`` (the demo's
data), ``trainer`` (steps, evaluation), ``checkpoint`` (resumable runs), ``memory`` (what a run needs)."""

from qlora_np.train.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
