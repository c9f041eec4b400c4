"""Whole-model bitsandbytes checkpoints: transformers' files load here with its logits, ours load there."""

import json
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qlora_np.models.llama.hf import linear_from_bnb
from qlora_np.io.bnb import load_bnb_model, save_bnb_model
from qlora_np.errors import CheckpointError
from qlora_np.models.llama.config import LlamaConfig
from qlora_np.models.llama.model import LlamaModel
from qlora_np.models.llama.names import unpermute_rope_rows
from qlora_np.nn.lora import LoRALinear
from qlora_np.quant.codec import dequantize
from qlora_np.io.safetensors import read_safetensors, save_safetensors
from qlora_np.quant.tensor import QuantizedTensor

from .corruption import corrupted_copy
from .test_llama import tiny_weights

DATA = pathlib.Path(__file__).parent / "data"
CHECKPOINT = DATA / "bnb_model" / "checkpoint"
WIDE = LlamaConfig(vocab_size=48, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=192, rope_theta=10000.0, rms_norm_eps=1e-5, context_length=64)
"""Rows of 128 and 192 values hold whole 64-value blocks, so q and k permute exactly."""
IDS = np.array([5, 1, 33, 7, 20, 9])


def recorded():
    with np.load(DATA / "bnb_model" / "outputs.npz") as data:
        return data["ids"], data["logits"]


def forward_all(model, ids):
    return np.stack([model.forward(row) for row in ids])


def test_transformers_bnb_checkpoint_gives_its_logits():
    ids, logits = recorded()
    model = load_bnb_model(CHECKPOINT)
    np.testing.assert_allclose(forward_all(model, ids), logits, atol=1e-4)
    stored = read_safetensors(CHECKPOINT / "model.safetensors")
    v = model.blocks[1].linears["attn_v"].base                # loaded as stored, not decoded
    assert isinstance(v, QuantizedTensor) and v.double_quant
    for key, array in v.to_bnb("model.layers.1.self_attn.v_proj.weight").items():
        np.testing.assert_array_equal(array, stored[key], err_msg=key)
    # q rows of 32 values, blocks of 64: the blocks span rows, so q is decoded (exactly) to float
    q = model.blocks[0].linears["attn_q"].base
    state = {k: v for k, v in stored.items() if k.startswith("model.layers.0.self_attn.q_proj.weight")}
    decoded = dequantize(QuantizedTensor.from_bnb(state, "model.layers.0.self_attn.q_proj.weight"))
    np.testing.assert_array_equal(unpermute_rope_rows(q, 4), decoded)


@pytest.mark.parametrize("name", ["linear4bit_nf4_dq", "linear4bit_fp4"])
def test_bitsandbytes_linear4bit_state_dicts_load(name):
    tensors = read_safetensors(DATA / "bnb" / f"{name}.safetensors")
    weight = linear_from_bnb(tensors, "weight", (256, 192))
    with np.load(DATA / "bnb" / f"{name}_io.npz") as io:
        y = io["x"] @ dequantize(weight).T + tensors["bias"]
        np.testing.assert_allclose(y, io["y"], rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="the config needs"):
        linear_from_bnb(tensors, "weight", (192, 256))


def wide_model(tied=False):
    rng = np.random.default_rng(0)
    weights = tiny_weights(WIDE, seed=1, tied=tied)
    weights["token_embd.weight"] = rng.standard_normal((WIDE.vocab_size, WIDE.hidden_size)).astype(np.float32)
    return LlamaModel.from_weights(WIDE, weights, quant_type="nf4", double_quant=True)


@pytest.mark.parametrize("tied", [False, True])
def test_saved_checkpoint_loads_back_with_the_same_outputs(tmp_path, tied):
    model = wide_model(tied)
    config = save_bnb_model(model, tmp_path / "ckpt")
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == config
    stored = read_safetensors(tmp_path / "ckpt" / "model.safetensors")
    assert ("lm_head.weight" in stored) != tied
    up = model.blocks[0].linears["ffn_up"].base.to_bnb("model.layers.0.mlp.up_proj.weight")
    for key, array in up.items():                            # written exactly as bitsandbytes does
        np.testing.assert_array_equal(stored[key], array, err_msg=key)
    assert stored["model.layers.0.self_attn.q_proj.weight.absmax"].dtype == np.float32    # scales decoded
    loaded = load_bnb_model(tmp_path / "ckpt")
    for index, block in enumerate(model.blocks):
        for name, layer in block.linears.items():
            np.testing.assert_array_equal(dequantize(loaded.blocks[index].linears[name].base),
                                          dequantize(layer.base), err_msg=f"{index}.{name}")
    if tied:                # transformers ties lm_head to the float embedding, not to a 4-bit copy of it
        model.output = LoRALinear(model.embedding, mode="dense")
    np.testing.assert_allclose(loaded.forward(IDS), model.forward(IDS), rtol=1e-5, atol=1e-5)


def test_float_layers_are_quantized_when_saved(tmp_path):
    model = LlamaModel.from_weights(WIDE, tiny_weights(WIDE), quant_type=None)
    save_bnb_model(model, tmp_path / "ckpt", quant_type="fp4", double_quant=False)
    loaded = load_bnb_model(tmp_path / "ckpt")
    k = loaded.blocks[1].linears["attn_k"].base
    assert isinstance(k, QuantizedTensor) and k.quant_type == "fp4" and not k.double_quant
    for name in ("attn_q", "attn_k", "ffn_down"):            # q and k back in GGUF row order
        exact = model.blocks[1].linears[name].base
        error = dequantize(loaded.blocks[1].linears[name].base) - exact
        assert 0 < np.linalg.norm(error) / np.linalg.norm(exact) < 0.15


def test_transformers_loads_our_checkpoint_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    model = wide_model()
    save_bnb_model(model, tmp_path / "ckpt")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", device_map="cpu").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS[None])).logits[0].float().numpy()
    # Was 1e-4. bitsandbytes 0.49–0.50 on CPU repack a loaded Linear4bit for their CPU kernel
    # and compute it in bfloat16 whatever bnb_4bit_compute_dtype says: the loaded state has
    # bf16 absmax, and each Linear4bit output is a bf16 value (checked 3 Dec 2026, torch 2.13,
    # bnb 0.50.2, transformers 5.24: one layer's output is within one bf16 step of
    # bf16(x) @ bf16(W).T with W from our codes). So the logits differ by up to ~0.03 (0.5 %);
    # a wrong layout (q/k order, nibble order, scales) moves them by whole units.
    np.testing.assert_allclose(model.forward(IDS), theirs, atol=0.06)


# ---------------------------------------------------------------------------
# Malformed checkpoints
# ---------------------------------------------------------------------------

def _copy(folder, tensors_edit=None, config_edit=None):
    folder.mkdir()
    tensors = {k: np.array(v) for k, v in read_safetensors(CHECKPOINT / "model.safetensors").items()}
    if tensors_edit:
        tensors_edit(tensors)
    save_safetensors(folder / "model.safetensors", tensors)
    config = json.loads((CHECKPOINT / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


V = "model.layers.0.self_attn.v_proj.weight"
QS = V + ".quant_state.bitsandbytes__nf4"


def _json_bytes(text):
    return np.frombuffer(text.encode(), np.uint8).copy()


@pytest.mark.parametrize("tensors_edit, config_edit, match", [
    (lambda t: t.pop("model.norm.weight"), None, "no tensor 'model.norm.weight'"),
    (lambda t: t.update({QS: _json_bytes("{\"quant_type\": ")}), None, "valid UTF-8 JSON"),
    (lambda t: t.update({QS: _json_bytes(bytes(t[QS]).decode().replace("[16, 32]", "[32, 16]"))}), None,
     "the config needs"),
    (lambda t: t.update({V + ".absmax": t[V + ".absmax"][:3]}), None, "absmax"),
    (lambda t: t.pop(V + ".nested_absmax"), None, "nested_absmax"),
    (lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:, :16]}), None,
     "float tensor of shape"),
    (None, lambda c: c.pop("hidden_size"), "missing or malformed"),
    (None, lambda c: c.update(num_attention_heads=3), "do not split"),
    (None, lambda c: c.update(vocab_size=-1), "missing or malformed"),
])
def test_malformed_checkpoints_raise_checkpoint_errors(tmp_path, tensors_edit, config_edit, match):
    folder = _copy(tmp_path / "bad", tensors_edit, config_edit)
    with pytest.raises(CheckpointError, match=match):
        load_bnb_model(folder)


def test_missing_truncated_and_badly_indexed_files_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_bnb_model(tmp_path)
    folder = _copy(tmp_path / "a")
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[:-100])
    with pytest.raises(CheckpointError, match="byte range"):
        load_bnb_model(folder)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="plain file names"):
        load_bnb_model(folder)
    index.write_text(json.dumps({"weight_map": {"x": "shard-2.safetensors"}}))
    with pytest.raises(CheckpointError, match="no shard-2"):
        load_bnb_model(folder)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), target=st.sampled_from(["config.json", "model.safetensors"]))
def test_corrupted_checkpoints_raise_checkpoint_errors_or_load(tmp_path_factory, data, target):
    folder = tmp_path_factory.mktemp("bnb")
    corrupted_copy(CHECKPOINT, ("config.json", "model.safetensors"), target, data, folder)
    try:
        load_bnb_model(folder)
    except CheckpointError:
        pass


# ---------------------------------------------------------------------------
# Merged float checkpoints (PEFT's merge_and_unload + save_pretrained)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type, tied", [(None, True), ("nf4", False)])
def test_merged_hugging_face_checkpoint_gives_the_adapted_models_outputs(tmp_path, quant_type, tied):
    """(A tied LM head is stored as the float embedding, so the 4-bit case unties it to compare.)"""
    from qlora_np.io.bnb import save_merged_hf

    from .test_gguf_export import tiny_adapted

    model = tiny_adapted(quant_type, tied=tied)
    config = save_merged_hf(model, tmp_path / "f32", "F32")
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = LlamaModel.from_hf(tmp_path / "f32", quant_type=None)
    ids = np.array([3, 17, 5, 39, 9, 1])
    expected = model.forward(ids)
    np.testing.assert_allclose(merged.forward(ids), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert merged.tied_output == tied
    save_merged_hf(model, tmp_path / "bf16")                                     # BF16 by default
    stored = read_safetensors(tmp_path / "bf16" / "model.safetensors")
    assert str(stored["model.layers.0.self_attn.q_proj.weight"].dtype) == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    from qlora_np.errors import UnknownFormatError
    with pytest.raises(UnknownFormatError, match="F32, F16, BF16"):
        save_merged_hf(model, tmp_path / "q", "Q8_0")
