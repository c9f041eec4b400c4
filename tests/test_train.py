"""Fine-tuning: exact resume, checkpoint checks, accumulation, packing, evaluation and logs."""

import dataclasses
import json

import numpy as np
import pytest

from qlora_np.train.checkpoint import ADAPTERS, STATE, latest_checkpoint, load_checkpoint
from qlora_np.train.data import epoch_batches, tokenize_record
from qlora_np.errors import CheckpointError, InvalidValueError, UnknownFormatError
from qlora_np.models.llama.config import LlamaConfig
from qlora_np.models.llama.model import LlamaModel
from qlora_np.models.llama.lora import inject_lora, loss_and_backward, trainable_parameters
from qlora_np.io.peft import load_peft, peft_names
from qlora_np.train.trainer import TrainConfig, Trainer, plot_loss_curve

from .test_llama import tiny_weights

TINY_VOCAB = LlamaConfig(vocab_size=49152, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=48, context_length=256)


def tiny_model(tokenizer, quant_type="nf4"):
    model = LlamaModel.from_weights(TINY_VOCAB, tiny_weights(TINY_VOCAB), quant_type=quant_type)
    model.tokenizer = tokenizer
    return model


def colour_examples(tokenizer, count=24, offset=0):
    colours = ["red", "green", "blue", "black", "white", "pink"]
    records = [{"messages": [{"role": "user", "content": f"Item {i + offset}: which colour?"},
                             {"role": "assistant", "content": colours[(i + offset) % len(colours)]}]}
               for i in range(count)]
    return [tokenize_record(record, tokenizer, f"colours:{i}") for i, record in enumerate(records)]


SETTINGS = dict(r=4, alpha=8, dropout=0.1, lr=5e-3, batch_size=3, grad_accum=2, max_steps=6,
                warmup_steps=2, checkpoint_every=3, eval_every=2, weight_decay=0.01, seed=3)


def adapters(trainer):
    return {name: param.value.copy() for name, param in trainer.params.items()}


def step_records(history):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in history]


@pytest.mark.parametrize("packing", [False, True])
def test_resume_is_bit_exact(tmp_path, smollm2_tokenizer, packing):
    examples = colour_examples(smollm2_tokenizer)
    config = TrainConfig(**SETTINGS, packing=packing, max_length=96)
    straight = Trainer(tiny_model(smollm2_tokenizer), examples[:20], examples[20:], config,
                       output_dir=tmp_path / "a", progress=False)
    straight.train()
    assert straight.step == 6 and straight.total_steps == 6

    resumed = Trainer(tiny_model(smollm2_tokenizer), examples[:20], examples[20:], config,
                      output_dir=tmp_path / "b", progress=False)
    resumed.resume(tmp_path / "a" / "checkpoint-000003")
    assert resumed.step == 3
    resumed.train()
    for name, value in adapters(straight).items():
        assert np.array_equal(value, resumed.params[name].value), name
    assert step_records(resumed.history) == step_records(straight.history)
    assert straight.history[0]["loss"] != straight.history[-2]["loss"]          # it did train


def test_accumulated_micro_batches_equal_one_batch(smollm2_tokenizer):
    model = tiny_model(smollm2_tokenizer, quant_type=None)
    params = inject_lora(model, "all-linear", r=4, dtype=np.float64)
    for index, param in enumerate(params.values()):
        param.value[...] = np.random.default_rng(index).standard_normal(param.value.shape) * 0.1
    examples = colour_examples(smollm2_tokenizer, count=4)

    def gradients(batches):
        for param in params.values():
            param.grad = None
        normalizer = sum(batch.label_count for batch in batches)
        loss = sum(loss_and_backward(model, b.ids, b.labels, np.float64, positions=b.positions,
                                     normalizer=normalizer) for b in batches)
        return loss, {name: param.grad.copy() for name, param in params.items()}

    whole_loss, whole = gradients(epoch_batches(examples, 4, 0, 0, pad_id=2, shuffle=False))
    split_loss, split = gradients(epoch_batches(examples, 2, 0, 0, pad_id=2, shuffle=False))
    assert split_loss == pytest.approx(whole_loss, rel=1e-12)
    for name in whole:
        np.testing.assert_allclose(split[name], whole[name], rtol=1e-9, atol=1e-12)


def test_packed_rows_give_the_loss_and_gradients_of_separate_examples(smollm2_tokenizer):
    model = tiny_model(smollm2_tokenizer, quant_type=None)
    params = inject_lora(model, ["q_proj", "k_proj", "down_proj"], r=4, dtype=np.float64)
    for index, param in enumerate(params.values()):
        param.value[...] = np.random.default_rng(index).standard_normal(param.value.shape) * 0.1
    examples = colour_examples(smollm2_tokenizer, count=3)

    def run(batch):
        for param in params.values():
            param.grad = None
        loss = loss_and_backward(model, batch.ids, batch.labels, np.float64, positions=batch.positions,
                                 segments=batch.segments)
        return loss, {name: param.grad.copy() for name, param in params.items()}

    (packed,) = epoch_batches(examples, 1, 0, 0, pad_id=2, packing=True, max_length=200, shuffle=False)
    assert packed.ids.shape[0] == 1 and set(packed.segments[0]) == {0, 1, 2}
    (padded,) = epoch_batches(examples, 3, 0, 0, pad_id=2, shuffle=False)
    packed_loss, packed_grads = run(packed)
    padded_loss, padded_grads = run(padded)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-10)
    for name in packed_grads:
        np.testing.assert_allclose(packed_grads[name], padded_grads[name], rtol=1e-7, atol=1e-12)


def test_training_lowers_the_eval_loss(smollm2_tokenizer):
    examples = colour_examples(smollm2_tokenizer, count=30)
    config = TrainConfig(r=8, alpha=16, dropout=0.0, lr=1e-2, batch_size=6, max_steps=25, seed=1)
    trainer = Trainer(tiny_model(smollm2_tokenizer), examples, examples[:6], config, progress=False)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.history[-1]
    assert after["eval_loss"] < 0.5 * before
    assert after["eval_perplexity"] == pytest.approx(np.exp(after["eval_loss"]))


def test_outputs_metrics_and_checkpoints(tmp_path, smollm2_tokenizer):
    examples = colour_examples(smollm2_tokenizer, count=12)
    config = TrainConfig(r=2, batch_size=4, epochs=2, checkpoint_every=2, eval_every=3)
    trainer = Trainer(tiny_model(smollm2_tokenizer), examples, examples[:4], config, output_dir=tmp_path,
                      progress=False)
    assert trainer.total_steps == 6
    history = trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(history))
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines if "eval_loss" in r] == [3, 6]
    assert {r["epoch"] for r in lines if "loss" in r} == {0, 1}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006"]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-000006")
    adapters, optimizer, state = load_checkpoint(tmp_path / "checkpoint-000006")
    assert state["step"] == 6 and sorted(adapters) == sorted(key for key, _ in peft_names(trainer.model).values())
    assert sorted(optimizer["state"]) == sorted(trainer.params)
    assert all(saved["step"] == 6 for saved in optimizer["state"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]              # no leftovers
    assert (tmp_path / "loss_curve.png").exists() == plot_loss_curve([], tmp_path / "probe.png")


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the loss curve needs matplotlib (optional)")
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}]
    assert plot_loss_curve(history, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------
# A damaged or foreign checkpoint is refused, never silently ignored
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("run")
    examples = colour_examples(smollm2_tokenizer, count=8)
    trainer = Trainer(tiny_model(smollm2_tokenizer), examples, (), TrainConfig(r=2, max_steps=1, batch_size=4),
                      output_dir=folder, progress=False)
    trainer.train()
    return folder / "checkpoint-000001", examples


def fresh_trainer(tokenizer, examples, **changes):
    config = TrainConfig(**{"r": 2, "max_steps": 1, "batch_size": 4, **changes})
    return Trainer(tiny_model(tokenizer), examples, (), config, progress=False)


def damaged_copy(source, tmp_path, name, change):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(source, target)
    path = target / name
    path.write_bytes(change(path.read_bytes()))
    return target


@pytest.mark.parametrize("name, change, message", [
    (ADAPTERS, lambda b: b[:-7] + b"\x00" * 7, "SHA-256"),
    (ADAPTERS, lambda b: b[:100], "SHA-256"),
    (STATE, lambda b: b[:50], "not valid JSON"),
    (STATE, lambda b: b.replace(b'"version": 2', b'"version": 99'), "version 99"),
    (STATE, lambda b: b.replace(b'"position"', b'"place"'), "malformed trainer state"),
    (STATE, lambda b: b"[]", "not a qlora_np training checkpoint"),
])
def test_damaged_checkpoints_raise(tmp_path, smollm2_tokenizer, saved_run, name, change, message):
    folder, examples = saved_run
    damaged = damaged_copy(folder, tmp_path, name, change)
    with pytest.raises(CheckpointError, match=message):
        fresh_trainer(smollm2_tokenizer, examples).resume(damaged)


def test_missing_files_raise(tmp_path, smollm2_tokenizer, saved_run):
    folder, examples = saved_run
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        fresh_trainer(smollm2_tokenizer, examples).resume(tmp_path / "nowhere")
    damaged = damaged_copy(folder, tmp_path, ADAPTERS, lambda b: b)
    (damaged / ADAPTERS).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        fresh_trainer(smollm2_tokenizer, examples).resume(damaged)


def test_mismatched_runs_are_refused(smollm2_tokenizer, saved_run):
    folder, examples = saved_run
    with pytest.raises(CheckpointError, match="r: checkpoint 2, now 4"):
        fresh_trainer(smollm2_tokenizer, examples, r=4).resume(folder)
    with pytest.raises(CheckpointError, match="other training data"):
        fresh_trainer(smollm2_tokenizer, examples[:-1]).resume(folder)
    other_model = Trainer(tiny_model(smollm2_tokenizer, quant_type="fp4"), examples, (),
                          TrainConfig(r=2, max_steps=1, batch_size=4), progress=False)
    with pytest.raises(CheckpointError, match="another model"):
        other_model.resume(folder)
    longer = fresh_trainer(smollm2_tokenizer, examples, max_steps=3)          # training longer is allowed
    longer.resume(folder)
    assert longer.step == 1 and longer.total_steps == 3


def test_bad_settings_raise():
    with pytest.raises(InvalidValueError, match="batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(InvalidValueError, match="dropout"):
        TrainConfig(dropout=1.0)
    with pytest.raises(UnknownFormatError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(UnknownFormatError, match="compute_dtype"):
        TrainConfig(compute_dtype="float16")


def test_compute_dtype_reaches_every_layer_and_is_part_of_a_run(tmp_path, smollm2_tokenizer, saved_run):
    folder, examples = saved_run
    trainer = fresh_trainer(smollm2_tokenizer, examples, compute_dtype="bfloat16")
    assert {layer.compute_dtype for layer in trainer.model.linear_layers()} == {"bfloat16"}
    with pytest.raises(CheckpointError, match="compute_dtype: checkpoint 'float32', now 'bfloat16'"):
        trainer.resume(folder)
    def without_compute_dtype(state_bytes):                          # as written before it existed
        state = json.loads(state_bytes)
        del state["config"]["compute_dtype"]
        return json.dumps(state).encode()

    older = damaged_copy(folder, tmp_path, STATE, without_compute_dtype)
    resumed = fresh_trainer(smollm2_tokenizer, examples)
    resumed.resume(older)
    assert resumed.step == 1


def test_trained_adapters_change_generation_mode_free_of_dropout(smollm2_tokenizer):
    examples = colour_examples(smollm2_tokenizer, count=6)
    model = tiny_model(smollm2_tokenizer)
    trainer = Trainer(model, examples, (), TrainConfig(r=2, dropout=0.5, max_steps=2, batch_size=3), progress=False)
    trainer.train()
    model.eval()
    ids = examples[0].ids
    assert np.array_equal(model.forward(ids), model.forward(ids))              # eval: no dropout
    assert sorted(trainable_parameters(model)) == sorted(trainer.params)


def test_load_adapters_reproduces_the_trained_model(tmp_path, smollm2_tokenizer):
    from qlora_np.train.trainer import load_adapters

    examples = colour_examples(smollm2_tokenizer, count=6)
    trained = tiny_model(smollm2_tokenizer)
    Trainer(trained, examples, (), TrainConfig(r=2, max_steps=2, batch_size=3, lr=1e-2), output_dir=tmp_path,
            progress=False).train()
    loaded = tiny_model(smollm2_tokenizer)
    load_adapters(loaded, tmp_path / "checkpoint-000002")
    trained.eval()
    loaded.eval()
    ids = examples[0].ids
    np.testing.assert_array_equal(loaded.forward(ids), trained.forward(ids))
    assert not np.array_equal(loaded.forward(ids), tiny_model(smollm2_tokenizer).forward(ids))


def test_a_checkpoint_is_a_peft_adapter_folder(tmp_path, smollm2_tokenizer):
    """PEFT (and the export-gguf / merge commands) load a checkpoint folder as it is: same outputs."""
    examples = colour_examples(smollm2_tokenizer, count=6)
    trained = tiny_model(smollm2_tokenizer)
    config = TrainConfig(r=2, alpha=6, max_steps=2, batch_size=3, lr=1e-2, target_modules="all-linear")
    Trainer(trained, examples, (), config, output_dir=tmp_path, progress=False).train()
    folder = tmp_path / "checkpoint-000002"
    peft_config = json.loads((folder / "adapter_config.json").read_text())
    assert (peft_config["r"], peft_config["lora_alpha"], peft_config["lora_dropout"]) == (2, 6.0, 0.05)
    loaded = tiny_model(smollm2_tokenizer)
    load_peft(loaded, folder)
    trained.eval()
    loaded.eval()
    ids = examples[0].ids
    np.testing.assert_array_equal(loaded.forward(ids), trained.forward(ids))
    assert not np.array_equal(loaded.forward(ids), tiny_model(smollm2_tokenizer).forward(ids))


def as_version_1(folder, trainer, target):
    """A copy of a checkpoint as version 1 wrote it: adapters under the optimizer's names, no PEFT config."""
    import hashlib
    import shutil

    from qlora_np.io.safetensors import save_safetensors

    shutil.copytree(folder, target)
    (target / "adapter_config.json").unlink()
    adapters, _, _ = load_checkpoint(folder)
    by_name = {name: adapters[key] for name, (key, _) in peft_names(trainer.model).items()}
    for name, (key, heads) in peft_names(trainer.model).items():
        if heads is not None:
            by_name[name] = trainer.params[name].value.copy()
    save_safetensors(target / ADAPTERS, by_name)
    state = json.loads((target / STATE).read_text())
    state["version"] = 1
    state["sha256"][ADAPTERS] = hashlib.sha256((target / ADAPTERS).read_bytes()).hexdigest()
    (target / STATE).write_text(json.dumps(state))
    return target


def test_version_1_checkpoints_still_resume_exactly(tmp_path, smollm2_tokenizer):
    from qlora_np.train.trainer import load_adapters

    examples = colour_examples(smollm2_tokenizer)
    config = TrainConfig(**{**SETTINGS, "max_steps": 3, "checkpoint_every": 0}, target_modules="all-linear")
    first = Trainer(tiny_model(smollm2_tokenizer), examples[:20], (), config, output_dir=tmp_path / "a",
                    progress=False)
    first.train()
    old = as_version_1(tmp_path / "a" / "checkpoint-000003", first, tmp_path / "old")
    longer = dataclasses.replace(config, max_steps=5)
    runs = []
    for folder in (tmp_path / "a" / "checkpoint-000003", old):
        trainer = Trainer(tiny_model(smollm2_tokenizer), examples[:20], (), longer, progress=False)
        trainer.resume(folder)
        trainer.train()
        runs.append(adapters(trainer))
    for name, value in runs[0].items():
        assert np.array_equal(value, runs[1][name]), name
    model = tiny_model(smollm2_tokenizer)
    load_adapters(model, old)
    for name, param in trainable_parameters(model).items():
        assert np.array_equal(param.value, first.params[name].value), name


def test_exact_match_compares_greedy_replies(smollm2_tokenizer):
    from qlora_np.train.trainer import exact_match

    model = tiny_model(smollm2_tokenizer)
    records = [{"messages": [{"role": "user", "content": "Say anything"}, {"role": "assistant", "content": "x"}]}]
    rate, results = exact_match(model, records, max_new_tokens=3)
    question, expected, generated = results[0]
    assert (question, expected) == ("Say anything", "x") and rate == float(generated == "x")


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, 1e-2, 1e-2]),
    ("linear", [1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, 2e-2 / 3, 1e-2 / 3]),
])
def test_schedules_after_warm_up(smollm2_tokenizer, schedule, expected):
    examples = colour_examples(smollm2_tokenizer, count=6)
    config = TrainConfig(r=2, lr=1e-2, schedule=schedule, warmup_steps=3, max_steps=6, batch_size=1)
    trainer = Trainer(tiny_model(smollm2_tokenizer), examples, (), config, progress=False)
    trainer.train()
    assert [r["lr"] for r in trainer.history if "lr" in r] == pytest.approx(expected)
