"""The README's Python examples run as written, in order, as a new user would paste them
(slow: they load the real SmolLM2-135M a few times). Only sizes are cut: training
steps and generated tokens."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SHORTER = {"max_steps=200": "max_steps=1", "max_new_tokens=32": "max_new_tokens=4"}


def python_blocks():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 5, "the README's Python examples were not found"
    for before, after in SHORTER.items():
        blocks = [block.replace(before, after) for block in blocks]
    return blocks


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    from qlora_np.demo import shipped_smollm2_path

    monkeypatch.chdir(tmp_path)
    for name in ("model.gguf", "base.gguf"):                  # the files the examples name
        (tmp_path / name).symlink_to(shipped_smollm2_path())
    records = [{"messages": [{"role": "user", "content": f"Say {word}"}, {"role": "assistant", "content": word}]}
               for word in ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    (tmp_path / "my_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    namespace = {}
    for index, block in enumerate(python_blocks()):
        if "layer.forward(x)" in block:                       # x and grad_y are the reader's own arrays
            namespace["x"] = np.ones((4, namespace["w"].shape[1]), np.float32)
            namespace["grad_y"] = np.ones((4, namespace["w"].shape[0]), np.float32)
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"README python block {index} failed: {type(error).__name__}: {error}\n{block}")
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and (tmp_path / "merged.gguf").exists()
    assert "QuantizedTensor(shape=(256, 192)" in capsys.readouterr().out
