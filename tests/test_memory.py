"""The memory model: parameter counts, bytes per set-up, the text table and chart."""

import numpy as np
import pytest

from qlora_np import LoRALinear
from qlora_np.train import memory
from qlora_np.train.memory import GIB, LLAMA_SHAPES, NF4_DQ_BITS


@pytest.mark.parametrize("name, billions", [("7B", 6.74), ("13B", 13.02), ("70B", 68.98)])
def test_parameter_counts_match_the_published_models(name, billions):
    assert LLAMA_SHAPES[name].parameters / 1e9 == pytest.approx(billions, abs=0.01)


def test_setups_follow_their_bytes_per_parameter():
    shape = LLAMA_SHAPES["7B"]
    parts = memory.training_bytes(shape, r=16)
    n = shape.parameters
    assert sum(parts["full fp32"].values()) == 16 * n
    assert sum(parts["full fp16 mixed"].values()) == 16 * n          # 2 + 2 + fp32 master 4 + moments 8
    assert parts["LoRA (fp16 base)"]["frozen weights"] == 2 * n
    assert parts["QLoRA (NF4 base)"]["adapters+grads+optimizer"] == shape.lora_parameters(16) * 16
    assert NF4_DQ_BITS == pytest.approx(4.127, abs=1e-3)
    qlora_total = sum(parts["QLoRA (NF4 base)"].values()) / GIB
    assert 3.5 < qlora_total < 10                              # fits a consumer GPU, as in the paper
    assert shape.lora_parameters(16) == 32 * 16 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    bf16 = memory.training_bytes(shape, r=16, adapter_dtype="bf16")
    assert bf16["QLoRA (NF4 base)"]["adapters+grads+optimizer"] == shape.lora_parameters(16) * 12


def test_70b_counts_grouped_query_attention():
    shape = LLAMA_SHAPES["70B"]
    assert shape.linear_shapes[1] == (1024, 8192)                # k: 8 KV heads of 128
    assert sum(memory.training_bytes(shape, r=16)["QLoRA (NF4 base)"].values()) / GIB < 48


def test_formula_agrees_with_the_arrays_of_a_real_qlora_layer():
    weight = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)
    layer = LoRALinear.from_weight(weight, r=8, mode="qlora", blocksize=64, double_quant=True)
    parts = memory.setup_bytes(weight.size, 0, layer.trainable_parameters())["QLoRA (NF4 base)"]
    assert parts["frozen weights"] == pytest.approx(layer.base.nbytes, rel=1e-3)
    report = layer.memory_report()
    trained = report["adapters"] + report["gradients"] + report["optimizer_state"]
    assert parts["adapters+grads+optimizer"] == trained


def test_table_and_chart_show_every_setup():
    table = memory.format_scaling_table(r=8)
    for label in memory.SETUPS + ("LLaMA-2 7B", "LLaMA-2 13B", "LLaMA-2 70B", "rank 8"):
        assert label in table
    chart = memory.setup_bar_chart(LLAMA_SHAPES["7B"])
    lines = chart.splitlines()[1:]
    assert [line.split("█")[0].strip() for line in lines] == list(memory.SETUPS)
    bars = [line.count("█") for line in lines]
    assert bars[0] == 50 and bars == sorted(bars, reverse=True)
