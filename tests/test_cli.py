"""The ``qlora-np`` command line on the real SmolLM2-135M (slow: loads the model each time)."""

import json
from pathlib import Path

import pytest

from qlora_np import cli
from qlora_np.train.checkpoint import latest_checkpoint


def run(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture()
def small_data(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"messages": [{"role": "user", "content": f"Repeat {word}"}, {"role": "assistant", "content": word}]}
               for word in ("apple", "river", "stone", "cloud", "ember", "maple")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.slow
def test_finetune_resume_and_generate_with_the_adapter(tmp_path, small_data, capsys):
    out_dir = tmp_path / "run"
    common = ["finetune", "--data", str(small_data), "--output-dir", str(out_dir), "--batch-size", "2",
              "--max-length", "64", "--eval-fraction", "0.34", "--r", "2", "--target-modules", "q_proj,v_proj",
              "--checkpoint-every", "1"]
    status, out, err = run(common + ["--max-steps", "1"], capsys)
    assert status == 0, err
    assert "4 training and 2 evaluation examples" in out and "eval loss" in out
    assert latest_checkpoint(out_dir).endswith("checkpoint-000001")
    status, out, err = run(common + ["--max-steps", "2", "--resume"], capsys)
    assert status == 0, err
    assert "resumed from" in out and "at step 1" in out
    assert latest_checkpoint(out_dir).endswith("checkpoint-000002")
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    assert f"saved in {latest_checkpoint(out_dir)}" in out
    generate = ["generate", "--chat", "--prompt", "Repeat apple", "--max-new-tokens", "4", "--adapter"]
    status, from_checkpoint, err = run(generate + [latest_checkpoint(out_dir)], capsys)
    assert status == 0, err
    assert from_checkpoint.startswith("Repeat apple")
    adapter_gguf = str(tmp_path / "adapter.gguf")
    status, out, err = run(["export-gguf", latest_checkpoint(out_dir), adapter_gguf], capsys)
    assert status == 0, err
    assert "adapter.lora.alpha = 16" in out          # --alpha's default: llama.cpp's scale is alpha / r
    status, from_gguf, err = run(generate + [adapter_gguf], capsys)
    assert status == 0, err
    assert from_gguf == from_checkpoint


@pytest.mark.slow
def test_finetune_reports_bad_input_without_a_traceback(tmp_path, small_data, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n', encoding="utf-8")
    status, _, err = run(["finetune", "--data", str(bad), "--output-dir", str(tmp_path / "x")], capsys)
    assert status == 2 and "bad.jsonl:2" in err
    status, _, err = run(["finetune", "--data", str(small_data), "--output-dir", str(tmp_path / "y"),
                          "--resume"], capsys)
    assert status == 2 and "no checkpoint" in err
    status, _, err = run(["finetune", "--data", str(small_data), "--output-dir", str(tmp_path / "z"),
                          "--batch-size", "0"], capsys)
    assert status == 2 and "batch_size=0" in err
    long = tmp_path / "long.jsonl"
    long.write_text(small_data.read_text() + json.dumps({"prompt": "word " * 80, "completion": "yes"}) + "\n")
    status, _, err = run(["finetune", "--data", str(long), "--output-dir", str(tmp_path / "w"), "--max-length",
                          "48", "--max-steps", "1", "--target-modules", "q_proj", "--r", "2"], capsys)
    assert status == 0, err
    assert "qlora-np: warning: left out 1 of 7 records" in err and "long.jsonl:7" in err


def test_finetune_and_generate_take_a_hugging_face_folder(tmp_path, small_data, capsys, smollm2_tokenizer):
    from .test_llama import _write_hf, tiny_weights, write_hf_tokenizer
    from .test_train import TINY_VOCAB

    folder = tmp_path / "hf"
    folder.mkdir()
    _write_hf(folder, tiny_weights(TINY_VOCAB), TINY_VOCAB)
    status, _, err = run(["generate", str(folder), "--prompt", "Hi"], capsys)
    assert status == 2 and "no tokenizer.json" in err
    write_hf_tokenizer(folder, smollm2_tokenizer)
    status, out, err = run(["finetune", str(folder), "--data", str(small_data), "--output-dir",
                            str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2"], capsys)
    assert status == 0, err
    assert "eval loss" in out
    status, out, err = run(["generate", str(folder), "--chat", "--prompt", "Repeat apple",
                            "--max-new-tokens", "3", "--adapter", latest_checkpoint(tmp_path / "run")], capsys)
    assert status == 0, err
    assert out.startswith("Repeat apple\n") and len(out) > len("Repeat apple\n\n")
    peft_config = json.loads((Path(latest_checkpoint(tmp_path / "run")) / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == str(folder)                # AutoPeftModel finds the base
    status, out, err = run(["export-gguf", "--base", str(folder), latest_checkpoint(tmp_path / "run"),
                            str(tmp_path / "adapter.gguf")], capsys)
    assert status == 0, err
    status, out, err = run(["merge", str(folder), latest_checkpoint(tmp_path / "run"), str(tmp_path / "merged")],
                           capsys)
    assert status == 0, err
    assert "Hugging Face checkpoint, BF16" in out and (tmp_path / "merged" / "tokenizer.json").exists()
    status, _, err = run(["merge", str(folder), latest_checkpoint(tmp_path / "run"), str(tmp_path / "m.gguf")],
                         capsys)
    assert status == 2 and "needs a GGUF base" in err
