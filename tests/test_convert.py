"""Streaming checkpoint quantization, the info table, NF4 → IQ4_NL / Q4_0, and the interop commands."""

import json
import tracemalloc

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qlora_np import quantize
from qlora_np.io.bnb import load_bnb_model
from qlora_np.cli import main
from qlora_np.io.convert import describe, format_info, quantize_checkpoint
from qlora_np.errors import CheckpointError, ShapeError, UnknownFormatError
from qlora_np.io.gguf_quants import KVALUES, nf4_to_gguf, quantize_iq4_nl
from qlora_np.models.llama.model import LlamaModel
from qlora_np.quant.codec import dequantize
from qlora_np.io.safetensors import read_safetensors, save_safetensors
from qlora_np.quant.tensor import QuantizedTensor

from .test_gguf_export import tiny_adapted, tiny_source
from .test_peft_io import PEFT_DIR

IQ4_NL = gguf.GGMLQuantizationType.IQ4_NL


def sharded_checkpoint(folder, bfloat16=False):
    """Three shards: 30 weights of 1 MiB (float32) and the largest, 2 MiB; norms and an embedding."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    folder.mkdir()
    for shard in range(3):
        tensors = {f"model.layers.{10 * shard + i}.mlp.up_proj.weight":
                   rng.standard_normal((256, 1024)).astype(np.float32) for i in range(10)}
        tensors[f"model.layers.{shard}.input_layernorm.weight"] = np.ones(1024, np.float32)
        if shard == 1:
            largest = rng.standard_normal((512, 1024)).astype(np.float32)
            tensors["model.layers.99.mlp.down_proj.weight"] = largest
            tensors["model.embed_tokens.weight"] = rng.standard_normal((64, 1024)).astype(np.float32)
        if bfloat16:
            tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
        save_safetensors(folder / f"model-0000{shard}-of-00003.safetensors", tensors)
    return folder


def test_streaming_quantization_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    source = sharded_checkpoint(tmp_path / "in")
    quantize_checkpoint(source, tmp_path / "warm.safetensors")     # compile every kernel outside the trace
    tracemalloc.start()
    try:
        summary = quantize_checkpoint(source, tmp_path / "out.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    largest = 512 * 1024 * 4
    assert summary["bytes_in"] > 15 * largest and summary["quantized"] == 31
    assert peak < 1.25 * largest + 2 ** 20                    # the largest tensor's 4-bit copy + 1 MiB buffer


def test_streamed_checkpoint_holds_bitsandbytes_entries_of_every_weight(tmp_path):
    source = sharded_checkpoint(tmp_path / "in", bfloat16=True)
    quantize_checkpoint(source, tmp_path / "out.safetensors", "fp4", 128, double_quant=False)
    inputs = {}
    for shard in sorted(source.iterdir()):
        inputs.update(read_safetensors(shard))
    out = read_safetensors(tmp_path / "out.safetensors")
    name = "model.layers.99.mlp.down_proj.weight"
    expected = quantize(inputs[name], "fp4", 128, False).to_bnb(name)
    assert sorted(k for k in out if k.startswith(name)) == sorted(expected)
    for key, array in expected.items():
        np.testing.assert_array_equal(out[key], array, err_msg=key)
    for kept in ("model.embed_tokens.weight", "model.layers.2.input_layernorm.weight"):
        assert out[kept].dtype == inputs[kept].dtype
        np.testing.assert_array_equal(out[kept], inputs[kept])


def test_streamed_hf_folder_loads_as_a_bitsandbytes_model(tmp_path):
    quantize_checkpoint(PEFT_DIR / "base", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    model = load_bnb_model(tmp_path / "out")
    reference = LlamaModel.from_hf(PEFT_DIR / "base", quant_type=None)
    ids = np.array([5, 1, 33, 7, 20])
    up = model.blocks[0].linears["ffn_up"].base
    assert isinstance(up, QuantizedTensor) and up.quant_type == "nf4"
    error = dequantize(up) - reference.blocks[0].linears["ffn_up"].base
    assert np.linalg.norm(error) / np.linalg.norm(reference.blocks[0].linears["ffn_up"].base) < 0.12
    assert np.abs(model.forward(ids) - reference.forward(ids)).max() < 3.0


def test_gguf_source_into_one_file_is_quantized_under_its_own_names(tmp_path):
    source = tiny_source(tmp_path)
    summary = quantize_checkpoint(source, tmp_path / "out.safetensors", blocksize=32)
    out = read_safetensors(tmp_path / "out.safetensors")
    assert summary["quantized"] == 2 * 7
    assert "blk.0.attn_q.weight.quant_state.bitsandbytes__nf4" in out
    assert out["token_embd.weight"].dtype == np.float32                     # embeddings stay float


def test_llama_gguf_into_a_folder_becomes_a_hugging_face_bitsandbytes_checkpoint(tmp_path):
    from qlora_np.models.llama.names import permute_rope_rows, unpermute_rope_rows

    from .test_llama import TINY, tiny_weights

    source = tiny_source(tmp_path)
    quantize_checkpoint(source, tmp_path / "hf", "fp4", blocksize=32, double_quant=False)
    stored = read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert "model.layers.1.self_attn.k_proj.weight.quant_state.bitsandbytes__fp4" in stored
    assert not [name for name in stored if name.startswith(("blk.", "token_embd"))]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (
        TINY.num_layers, TINY.num_kv_heads, True)
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    model = LlamaModel.from_hf(tmp_path / "hf")                  # a bitsandbytes folder: weights as stored
    weights = tiny_weights()
    for name, heads in (("attn_q", TINY.num_heads), ("attn_k", TINY.num_kv_heads), ("ffn_down", None)):
        weight = weights[f"blk.1.{name}.weight"]
        hf_order = weight if heads is None else unpermute_rope_rows(weight, heads)
        expected = dequantize(quantize(hf_order, "fp4", 32, False))          # quantized in HF's row order
        expected = expected if heads is None else permute_rope_rows(expected, heads)
        np.testing.assert_array_equal(dequantize(model.blocks[1].linears[name].base), expected)
    np.testing.assert_array_equal(model.embedding, weights["token_embd.weight"])


def test_quantize_refuses_bad_sources_and_types(tmp_path):
    with pytest.raises(UnknownFormatError, match="nf4 or fp4"):
        quantize_checkpoint(tmp_path, tmp_path / "o.safetensors", "int4")
    with pytest.raises(CheckpointError, match="no .safetensors"):
        quantize_checkpoint(tmp_path, tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        quantize_checkpoint(tmp_path / "absent.safetensors", tmp_path / "o.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError):
        quantize_checkpoint(tmp_path / "cut.safetensors", tmp_path / "o.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors"]


# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------

def test_info_groups_bitsandbytes_weights_and_totals_the_memory(tmp_path):
    quantize_checkpoint(PEFT_DIR / "base", tmp_path / "out")
    rows = {row[0]: row for row in describe(tmp_path / "out" / "model.safetensors")}
    name, kind, shape, nbytes, values = rows["model.layers.0.self_attn.k_proj.weight"]
    assert (kind, shape, values) == ("nf4 (bnb)", (16, 32), 512)
    state = read_safetensors(tmp_path / "out" / "model.safetensors")
    assert nbytes == sum(a.nbytes for k, a in state.items() if k.startswith(name))
    table = format_info(list(rows.values()))
    assert "nf4 (bnb)" in table and table.splitlines()[-2].startswith("total")
    gguf_rows = describe(tiny_source(tmp_path))
    assert ("blk.0.ffn_down.weight", "F32", (32, 48), 32 * 48 * 4, 32 * 48) in gguf_rows


_INFO_BLOB = {}


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_info_on_corrupted_files_raises_checkpoint_errors_or_describes(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("info")
    if "blob" not in _INFO_BLOB:
        quantize_checkpoint(PEFT_DIR / "base", folder / "good.safetensors")
        _INFO_BLOB["blob"] = (folder / "good.safetensors").read_bytes()
    blob = bytearray(_INFO_BLOB["blob"])
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    (folder / "bad.safetensors").write_bytes(bytes(blob[:data.draw(st.integers(len(blob) // 2, len(blob)))]))
    try:
        format_info(describe(folder / "bad.safetensors"))
    except CheckpointError:
        pass


# ---------------------------------------------------------------------------
# IQ4_NL and NF4 → GGUF 4-bit
# ---------------------------------------------------------------------------

def test_iq4_nl_blocks_decode_with_gguf_py_and_keep_grid_values_exactly():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (4, 64))
    codes[:, ::32] = 0                                     # every block holds −127: its scale is exact
    scales = np.float16(rng.uniform(0.01, 0.1, (4, 2))).astype(np.float32)
    grid = KVALUES[codes] * np.repeat(scales, 32, axis=1)                       # (4, 64) on the IQ4_NL grid
    blocks = quantize_iq4_nl(grid)
    assert blocks.shape == (4, 2 * 18) and blocks.dtype == np.uint8
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, IQ4_NL), grid)
    weights = rng.standard_normal((64, 256)).astype(np.float32)
    iq4 = gguf.quants.dequantize(quantize_iq4_nl(weights), IQ4_NL)
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_0),
                                  gguf.GGMLQuantizationType.Q4_0)
    assert np.linalg.norm(iq4 - weights) < 0.95 * np.linalg.norm(q4_0 - weights)   # non-linear grid wins
    with pytest.raises(ShapeError, match="multiple of 32"):
        quantize_iq4_nl(np.ones((2, 48), np.float32))


@pytest.mark.parametrize("tensor_type, bound", [("IQ4_NL", 0.08), ("Q4_0", 0.11)])
def test_nf4_tensors_convert_to_gguf_4bit_with_an_error_report(tensor_type, bound):
    weights = np.random.default_rng(1).standard_normal((96, 128)).astype(np.float32)
    qt = quantize(weights, "nf4", 64, True)
    blocks, report = nf4_to_gguf(qt, tensor_type)
    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[tensor_type])
    error = decoded - dequantize(qt)
    assert report.max_abs_error == pytest.approx(np.abs(error).max(), rel=1e-6)
    assert 0 < report.relative_error < bound
    with pytest.raises(UnknownFormatError):
        nf4_to_gguf(qt, "Q5_K")


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def test_commands_quantize_info_export_and_merge(tmp_path, capsys):
    from qlora_np.io.gguf_export import save_gguf_adapter
    from qlora_np.io.peft import save_peft

    assert main(["quantize", str(PEFT_DIR / "base"), str(tmp_path / "q")]) == 0
    assert "quantized 14 of" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "q" / "model.safetensors")]) == 0
    assert "nf4 (bnb)" in capsys.readouterr().out
    source = tiny_source(tmp_path)
    model = tiny_adapted()
    save_peft(model, tmp_path / "peft")
    assert main(["export-gguf", str(tmp_path / "peft"), str(tmp_path / "a.gguf"), "--base", str(source)]) == 0
    assert "adapter.lora.alpha = 8" in capsys.readouterr().out
    save_gguf_adapter(model, tmp_path / "ours.gguf")
    for adapter in (tmp_path / "peft", tmp_path / "a.gguf"):
        assert main(["merge", str(source), str(adapter), str(tmp_path / "m.gguf"), "--type", "F32"]) == 0
        assert "blk.1.attn_q.weight" in capsys.readouterr().out
        merged = LlamaModel.from_gguf(tmp_path / "m.gguf", quant_type=None)
        ids = np.array([5, 1, 33, 7])
        np.testing.assert_allclose(merged.forward(ids), model.forward(ids), rtol=1e-4, atol=1e-4)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    assert main(["info", str(tmp_path / "bad.gguf")]) == 2
    assert "not a readable GGUF" in capsys.readouterr().err
