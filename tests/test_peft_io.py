"""PEFT adapters: PEFT's own files load here with PEFT's outputs, and ours are PEFT's layout."""

import json
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qlora_np.errors import CheckpointError, InvalidValueError
from qlora_np.models.llama.model import LlamaModel
from qlora_np.models.llama.lora import inject_lora
from qlora_np.io.peft import load_peft, save_peft
from qlora_np.io.safetensors import read_safetensors, save_safetensors

from .corruption import corrupted_copy
from .test_gguf_export import randomize_b

PEFT_DIR = pathlib.Path(__file__).parent / "data" / "peft"
ADAPTER = PEFT_DIR / "adapter"


def base_model(quant_type=None):
    return LlamaModel.from_hf(PEFT_DIR / "base", quant_type=quant_type)


def recorded():
    with np.load(PEFT_DIR / "outputs.npz") as data:
        return {key: data[key] for key in data.files}


def forward_all(model, ids):
    return np.stack([model.forward(row) for row in ids])


def test_peft_saved_adapter_gives_peft_logits():
    outputs = recorded()
    model = base_model()
    np.testing.assert_allclose(forward_all(model, outputs["ids"]), outputs["base_logits"], atol=1e-4)
    config = load_peft(model, ADAPTER)
    assert config["use_rslora"] and config["rank_pattern"] == {"v_proj": 2}
    assert model.blocks[1].linears["attn_v"].r == 2
    assert model.blocks[0].linears["ffn_down"].scale == pytest.approx(3 / 2)      # alpha_pattern, rsLoRA
    logits = forward_all(model, outputs["ids"])
    np.testing.assert_allclose(logits, outputs["logits"], atol=1e-4)
    assert np.abs(outputs["logits"] - outputs["base_logits"]).max() > 1.0        # the adapters matter


def test_saved_adapter_has_peft_keys_values_and_scales(tmp_path):
    model = base_model()
    load_peft(model, ADAPTER)
    config = save_peft(model, tmp_path / "ours")
    theirs = read_safetensors(ADAPTER / "adapter_model.safetensors")
    ours = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:                             # q/k rows permuted in and back out: exact
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    peft_config = json.loads((ADAPTER / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "bias", "use_dora"):
        assert config[key] == peft_config[key], key
    assert sorted(config["target_modules"]) == sorted(peft_config["target_modules"])
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == config
    fresh = base_model()
    load_peft(fresh, tmp_path / "ours")
    np.testing.assert_allclose(forward_all(fresh, recorded()["ids"]), recorded()["logits"], atol=1e-4)


def adapted_tiny():
    """The PEFT test's base with our own adapters: two ranks, rsLoRA on one set, random B."""
    model = base_model()
    randomize_b(inject_lora(model, ["q_proj", "k_proj", "o_proj"], r=4, alpha=8, seed=1), 2, 0.3)
    randomize_b(inject_lora(model, ["up_proj"], r=2, alpha=3, use_rslora=True, seed=3), 4, 0.3)
    model.eval()
    return model


def test_our_adapters_round_trip_with_patterns(tmp_path):
    model = adapted_tiny()
    config = save_peft(model, tmp_path / "ours", base_model_name_or_path="tiny")
    assert config["rank_pattern"] == {f"model.layers.{i}.mlp.up_proj": 2 for i in range(2)}
    # the file-wide rule is plain LoRA (alpha / r): rsLoRA's alpha/√r becomes alpha' = alpha·√r
    assert config["alpha_pattern"] == {f"model.layers.{i}.mlp.up_proj": pytest.approx(3 * np.sqrt(2))
                                       for i in range(2)}
    fresh = base_model()
    load_peft(fresh, tmp_path / "ours")
    ids = recorded()["ids"]
    np.testing.assert_allclose(forward_all(fresh, ids), forward_all(model, ids), rtol=1e-5, atol=1e-5)


def test_our_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = adapted_tiny()
    save_peft(model, tmp_path / "ours")
    hf = transformers.LlamaForCausalLM.from_pretrained(PEFT_DIR / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    ids = recorded()["ids"]
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(forward_all(model, ids), theirs, atol=1e-4)


def test_save_refuses_models_peft_cannot_describe(tmp_path):
    from qlora_np.nn.lora import LoRALinear

    with pytest.raises(InvalidValueError, match="no adapters"):
        save_peft(base_model(), tmp_path / "a")
    model = base_model()
    inject_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
    assert save_peft(model, tmp_path / "a")["layers_to_transform"] is None
    block = model.blocks[1].linears
    block["attn_q"] = block["attn_v"] = LoRALinear(block["attn_q"].base, mode="dense")
    assert save_peft(model, tmp_path / "a")["layers_to_transform"] == [0]
    block["attn_v"] = LoRALinear.from_weight(np.zeros((16, 32), np.float32), mode="lora", r=2)
    with pytest.raises(InvalidValueError, match="same modules"):            # q in layer 0 only, v in both
        save_peft(model, tmp_path / "a")


# ---------------------------------------------------------------------------
# Malformed folders
# ---------------------------------------------------------------------------

def _copy_adapter(folder, config_edit=None, tensors_edit=None):
    folder.mkdir(exist_ok=True)
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    if config_edit:
        config_edit(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: np.array(v) for k, v in read_safetensors(ADAPTER / "adapter_model.safetensors").items()}
    if tensors_edit:
        tensors_edit(tensors)
    save_safetensors(folder / "adapter_model.safetensors", tensors)
    return folder


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("config_edit, tensors_edit, match", [
    (lambda c: c.update(peft_type="IA3"), None, "peft_type"),
    (lambda c: c.update(r=True), None, "r must be"),
    (lambda c: c.update(lora_alpha="8"), None, "lora_alpha"),
    (lambda c: c.update(lora_alpha=10 ** 400), None, "lora_alpha"),
    (lambda c: c.update(rank_pattern={"(a+)+$": 2}), None, "rank_pattern"),
    (lambda c: c.update(use_dora=True), None, "use_dora"),
    (lambda c: c.update(bias="all"), None, "bias"),
    (lambda c: c.update(r=8), None, "rank 4, the config says 8"),
    (None, lambda t: t.pop(Q_B), "has only lora_A"),
    (None, lambda t: t.update({Q_B: t[Q_B][:30]}), "adapters must be A"),
    (None, lambda t: t.update({Q_A: t[Q_A].T.copy()}), "rank 32"),
    (None, lambda t: t.update({Q_A: t[Q_A].astype(np.int32)}), "2-D float"),
    (None, lambda t: t[Q_A].__setitem__((0, 0), np.nan), "NaN"),
    (None, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": t[Q_A]}), "not a LoRA weight"),
    (None, lambda t: t.update({Q_A.replace("layers.0", "layers.7"): t[Q_A],
                               Q_B.replace("layers.0", "layers.7"): t[Q_B]}), "no layer blk.7"),
])
def test_malformed_peft_folders_raise_checkpoint_errors(tmp_path, config_edit, tensors_edit, match):
    folder = _copy_adapter(tmp_path / "bad", config_edit, tensors_edit)
    with pytest.raises(CheckpointError, match=match):
        load_peft(base_model(), folder)


def test_missing_truncated_and_pickled_adapters_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_peft(base_model(), tmp_path)
    folder = _copy_adapter(tmp_path / "a")
    (folder / "adapter_config.json").write_text("{\"r\": 4,")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_peft(base_model(), folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_peft(base_model(), folder)
    folder = _copy_adapter(tmp_path / "b")
    blob = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(blob[:-10])
    with pytest.raises(CheckpointError, match="byte range"):
        load_peft(base_model(), folder)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        load_peft(base_model(), folder)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), target=st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]))
def test_corrupted_peft_files_raise_checkpoint_errors_or_load(tmp_path_factory, data, target):
    folder = tmp_path_factory.mktemp("peft")
    corrupted_copy(ADAPTER, ("adapter_config.json", "adapter_model.safetensors"), target, data, folder)
    try:
        load_peft(base_model(), folder)
    except CheckpointError:
        pass
