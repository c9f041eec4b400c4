"""QLoRA fine-tuning: examples → batches → steps (forward, backward, AdamW) → evaluation, checkpoints.

    trainer = Trainer(model, train_examples, eval_examples, TrainConfig(r=8, lr=2e-4),
                      output_dir="runs/demo")
    trainer.train()                  # or trainer.resume("runs/demo/checkpoint-000100"); trainer.train()

One optimizer step runs ``grad_accum`` micro-batches of ``batch_size`` rows; the
gradient is that of the mean token loss over all of them. Everything random (adapter
initialisation, dropout, data order) comes from ``seed``, and a checkpoint stores the
exact state of each, so training N steps straight or N/2, save, resume, N/2 gives
bit-identical adapters and losses.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from qlora_np.train.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from qlora_np.errors import CheckpointError, InvalidValueError, UnknownFormatError
from qlora_np.train.data import epoch_batches
from qlora_np.models.llama.lora import inject_lora, loss_and_backward, summed_loss
from qlora_np.linalg.plan import compute_dtype_name
from qlora_np.nn.optim import (AdamW, LRScheduler, clip_grad_norm, warmup_cosine_schedule,
                               warmup_linear_schedule)
from qlora_np.io.peft import from_peft, peft_adapter
from qlora_np.io.safetensors import atomic_write

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = {"cosine": warmup_cosine_schedule, "linear": warmup_linear_schedule}
RESUMABLE_CHANGES = ("max_steps", "epochs", "eval_every", "checkpoint_every")
"""Config fields a resumed run may change (e.g. to train longer); any other change is refused."""


SETTINGS_ADDED_LATER = {"compute_dtype": "float32"}
"""Settings that older checkpoints do not record, with what those runs used."""


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved in every checkpoint)."""

    target_modules: tuple = ALL_LINEAR      # Hugging Face or GGUF names, or "all-linear"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    use_rslora: bool = False
    lr: float = 2e-4
    schedule: str = "cosine"                # "cosine", "linear" or "constant" (after warm-up)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0              # 0: no clipping
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    packing: bool = False
    epochs: int = 1
    max_steps: int = 0                      # > 0: stop after this many steps (overrides epochs)
    eval_every: int = 0                     # 0: evaluate only at the end
    checkpoint_every: int = 0               # 0: only a final checkpoint (when output_dir is set)
    gradient_checkpointing: bool = False
    compute_dtype: str = "float32"          # "bfloat16": the base's large products as bnb computes them
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        positive = ("r", "batch_size", "grad_accum", "max_length", "epochs")
        bad = [name for name in positive
               if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        bad += [name for name in ("warmup_steps", "max_steps", "eval_every", "checkpoint_every")
                if not isinstance(getattr(self, name), int) or getattr(self, name) < 0]
        bad += [name for name in ("lr", "weight_decay", "max_grad_norm", "alpha") if getattr(self, name) < 0]
        if not 0 <= self.dropout < 1:
            bad.append("dropout")
        if bad:
            settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise InvalidValueError(f"invalid training settings: {settings}")
        compute_dtype_name(self.compute_dtype)                     # UnknownFormatError if unknown
        if self.schedule not in (*SCHEDULES, "constant"):
            raise UnknownFormatError(f"schedule must be 'cosine', 'linear' or 'constant', "
                                     f"got {self.schedule!r}")

    def to_json(self):
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


class Trainer:
    """Trains LoRA adapters on a (4-bit) :class:`LlamaModel`; see the module docstring.

    The model gets adapters on ``config.target_modules`` (B = 0, so it starts as the
    base model). ``output_dir`` (optional) receives ``metrics.jsonl``, checkpoints and
    ``loss_curve.png`` (when matplotlib is installed).
    """

    def __init__(self, model, train_examples, eval_examples=(), config=None, output_dir=None,
                 progress=True):
        self.config = config = config or TrainConfig()
        if not train_examples:
            raise InvalidValueError("no training examples")
        self.model = model
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples)
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.progress = progress
        self.pad_id = model.tokenizer.eos_id if model.tokenizer is not None else 0
        self.params = inject_lora(model, config.target_modules, config.r, config.alpha, config.dropout,
                                  config.use_rslora, seed=config.seed)
        model.set_compute_dtype(config.compute_dtype)
        self.optimizer = AdamW(self.params, config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = math.ceil(len(self._batches(0)) / config.grad_accum)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.scheduler = LRScheduler(self.optimizer, self._schedule())
        self.step = 0             # optimizer steps done
        self.epoch = 0            # current pass over the data
        self.position = 0         # optimizer steps done within this epoch
        self.history = []         # one dict per step (and per evaluation)

    def _schedule(self):
        """lr per step: linear warm-up, then cosine / linear decay to 0, or constant
        (a linear "decay" down to lr itself)."""
        cfg = self.config
        decay = SCHEDULES.get(cfg.schedule, warmup_linear_schedule)
        min_lr = cfg.lr if cfg.schedule == "constant" else 0.0
        return decay(cfg.lr, min(cfg.warmup_steps, self.total_steps), self.total_steps, min_lr)

    def _batches(self, epoch):
        cfg = self.config
        return epoch_batches(self.train_examples, cfg.batch_size, cfg.seed, epoch, self.pad_id,
                             cfg.packing, cfg.max_length)

    # -- training -------------------------------------------------------------
    def train(self):
        """Run until ``total_steps``; returns the history (a dict per step and per evaluation)."""
        cfg = self.config
        bar = self._progress_bar()
        started, tokens_done = time.perf_counter(), 0
        self.model.train()
        while self.step < self.total_steps:
            batches = self._batches(self.epoch)
            groups = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
            while self.position < len(groups) and self.step < self.total_steps:
                record = self._optimizer_step(groups[self.position])
                tokens_done += record["tokens"]
                record["tokens_per_s"] = tokens_done / (time.perf_counter() - started)
                self._log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    bar.update(1)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self._log_evaluation()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.output_dir:
                    self.save_checkpoint()
            if self.position >= len(groups):
                self.epoch, self.position = self.epoch + 1, 0
        if bar is not None:
            bar.close()
        self._log_evaluation()
        if self.output_dir:
            self.save_checkpoint()
            plot_loss_curve(self.history, os.path.join(self.output_dir, "loss_curve.png"))
        return self.history

    def _optimizer_step(self, group):
        """Forward/backward over a group of micro-batches, clip, one AdamW step."""
        cfg = self.config
        normalizer = sum(batch.label_count for batch in group)
        lr = self.optimizer.lr
        loss = 0.0
        for batch in group:
            loss += loss_and_backward(self.model, batch.ids, batch.labels, positions=batch.positions,
                                      segments=batch.segments, normalizer=normalizer,
                                      checkpoint=cfg.gradient_checkpointing)
        grad_norm = clip_grad_norm(self.params, cfg.max_grad_norm if cfg.max_grad_norm else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.step += 1
        self.position += 1
        return {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": int(sum(batch.ids.size for batch in group)), "labels": normalizer}

    def evaluate(self, examples=None):
        """Mean token loss and perplexity on the eval examples (dropout off): a dict."""
        examples = self.eval_examples if examples is None else list(examples)
        if not examples:
            return None
        cfg = self.config
        self.model.eval()
        total, count = 0.0, 0
        for batch in epoch_batches(examples, cfg.batch_size, cfg.seed, 0, self.pad_id, shuffle=False):
            loss, labels = summed_loss(self.model, batch.ids, batch.labels, batch.positions, batch.segments)
            total, count = total + loss, count + labels
        self.model.train()
        return {"eval_loss": total / count, "eval_perplexity": math.exp(min(total / count, 700.0)),
                "eval_tokens": count}

    def _log_evaluation(self):
        result = self.evaluate()
        if result is not None:
            self._log({"step": self.step, **result})

    def _log(self, record):
        self.history.append(record)
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="fine-tuning", unit="step")

    # -- checkpoints ------------------------------------------------------------
    def save_checkpoint(self, folder=None):
        """Write everything needed to continue exactly; returns the folder."""
        if folder is None:
            if self.output_dir is None:
                raise InvalidValueError("save_checkpoint needs a folder or the trainer's output_dir")
            folder = os.path.join(self.output_dir, checkpoint_name(self.step))
        state = {"step": self.step, "epoch": self.epoch, "position": self.position,
                 "scheduler": self.scheduler.state_dict(),
                 "dropout_rng": self._dropout_states(), "config": self.config.to_json(),
                 "model": self._model_fingerprint(), "data": self._data_fingerprint(),
                 "history": self.history}
        save_checkpoint(folder, *peft_adapter(self.model, lora_dropout=self.config.dropout),
                        self.optimizer.state_dict(), state)
        return folder

    def resume(self, folder):
        """Load a checkpoint of this same run (model, data, settings); CheckpointError otherwise."""
        adapters, optimizer_state, state = load_checkpoint(folder)
        parameters = _by_parameter_name(self.model, adapters, state)
        try:
            self._check_compatible(folder, state)
            for name, param in self.params.items():
                value = parameters.get(name)
                if value is None or value.shape != param.value.shape:
                    raise CheckpointError(f"{folder}: adapter {name} is missing or has another shape")
                param.value[...] = value
            self.optimizer.load_state_dict(optimizer_state)
            self.scheduler.load_state_dict(state["scheduler"])
            for layer_name, layer in self._adapter_layers().items():
                layer.dropout_rng.bit_generator.state = state["dropout_rng"][layer_name]
            self.step, self.epoch, self.position = (int(state[key]) for key in ("step", "epoch", "position"))
            self.history = list(state["history"])
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(f"{folder}: malformed trainer state "
                                  f"({type(error).__name__}: {error})") from None

    def _check_compatible(self, folder, state):
        saved = {**SETTINGS_ADDED_LATER, **state["config"]}
        mine = self.config.to_json()
        changed = sorted(key for key in set(saved) | set(mine)
                         if key not in RESUMABLE_CHANGES and saved.get(key) != mine.get(key))
        if changed:
            details = ", ".join(f"{key}: checkpoint {saved.get(key)!r}, now {mine.get(key)!r}"
                                for key in changed)
            raise CheckpointError(f"{folder} was written with other settings ({details})")
        if state["model"] != self._model_fingerprint():
            raise CheckpointError(f"{folder} was written for another model")
        if state["data"] != self._data_fingerprint():
            raise CheckpointError(f"{folder} was written for other training data")

    def _adapter_layers(self):
        return {f"blk.{index}.{name}": layer for index, block in enumerate(self.model.blocks)
                for name, layer in block.linears.items() if layer.has_adapters}

    def _dropout_states(self):
        return {name: layer.dropout_rng.bit_generator.state for name, layer in self._adapter_layers().items()}

    def _model_fingerprint(self):
        model = self.model
        config = {key: value for key, value in dataclasses.asdict(model.config).items()
                  if value != ()}                    # as checkpoints from before the RoPE fields
        return {"config": json.loads(json.dumps(config)),          # tuples as the JSON file holds them
                "base": sorted({f"{type(layer.base).__name__}:{getattr(layer.base, 'quant_type', 'float')}"
                                for layer in model.linear_layers()}),
                "parameters": {name: list(p.value.shape) for name, p in self.params.items()}}

    def _data_fingerprint(self):
        digest = hashlib.sha256()
        for example in self.train_examples:
            digest.update(np.int64(len(example.ids)).tobytes())
            digest.update(example.ids.astype(np.int32).tobytes())
            digest.update(example.targets.astype(np.uint8).tobytes())
        return {"examples": len(self.train_examples), "sha256": digest.hexdigest()}


def load_adapters(model, folder):
    """Give ``model`` the adapters of a training checkpoint (as configured there); returns them."""
    adapters, _, state = load_checkpoint(folder)
    try:
        config = TrainConfig(**state["config"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}: malformed training config ({error})") from None
    params = inject_lora(model, config.target_modules, config.r, config.alpha, config.dropout,
                         config.use_rslora, seed=config.seed)
    parameters = _by_parameter_name(model, adapters, state)
    for name, param in params.items():
        value = parameters.get(name)
        if value is None or value.shape != param.value.shape:
            raise CheckpointError(f"{folder}: adapter {name} is missing or does not fit this model")
        param.value[...] = value
    return params


def _by_parameter_name(model, adapters, state):
    """A checkpoint's adapters under the optimizer's names (blk.N.attn_q.lora_a) in the
    model's row order: version 1 stored them so, later versions as PEFT does."""
    return adapters if state["version"] == 1 else from_peft(model, adapters)


def plot_loss_curve(history, path):
    """Training loss per step (and eval loss) as a PNG; returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    figure, axes = pyplot.subplots(figsize=(6, 3.5))
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy")
    if train or evals:
        axes.legend()
    figure.tight_layout()
    with atomic_write(path) as stream:
        figure.savefig(stream, format="png", dpi=100)
    pyplot.close(figure)
    return True


def exact_match(model, records, max_new_tokens=24):
    """Share of chat records whose greedy reply equals the record's last assistant message.

    Each record's conversation up to its last reply is the prompt (chat template); the
    generated text, stripped of surrounding white space, must equal that reply exactly.
    Returns (rate, [(question, expected, generated), …]).
    """
    model.eval()
    results = []
    for record in records:
        messages = record["messages"]
        expected = messages[-1]["content"]
        prompt = model.tokenizer.apply_chat_template(messages[:-1])
        generated = "".join(model.generate(prompt, max_new_tokens)).strip()
        results.append((messages[-2]["content"], expected, generated))
    model.train()
    return sum(expected == generated for _, expected, generated in results) / max(1, len(results)), results
