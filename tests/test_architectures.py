"""Every model the loaders meet is computed right or refused with UnsupportedModelError, never
loaded and run wrongly: Hugging Face configs of related architectures, config keys that change
the computation, tensors the model would not read, and GGUF metadata. The configs accepted
besides a plain Llama are checked against transformers' logits (recorded in
tests/data/architectures by make_architecture_vectors.py, and live where torch is installed)."""

import json
import pathlib
from dataclasses import replace

import numpy as np
import pytest

from qlora_np.errors import CheckpointError, UnsupportedModelError
from qlora_np.models.llama.config import llama3_frequency_factors
from qlora_np.models.llama.model import KVCache, LlamaModel

from .test_llama import TINY, _write_hf, tiny_weights

RECORDED = pathlib.Path(__file__).parent / "data" / "architectures" / "accepted_logits.npz"
IDS = [5, 1, 33, 7, 20, 9, 2, 38, 11, 0, 17, 25, 3, 30, 14, 8]
LONG_IDS = np.random.default_rng(7).integers(0, TINY.vocab_size, 1100).tolist()
"""Long enough for rope scaling to show: Llama 3's rope scaling divides the low frequencies."""
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
"""Llama 3.x's RoPE scaling, its original context cut to 64 so that with the tiny model's head
size of 8 the four frequencies fall in all three of its bands (kept, smoothed, divided)."""
HEAD_DIM = TINY.hidden_size // TINY.num_heads

ACCEPTED = {
    "llama": {"model_type": "llama", "attention_bias": False, "mlp_bias": False, "head_dim": HEAD_DIM,
              "rope_scaling": None, "hidden_act": "silu"},
    "mistral_without_window": {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                               "sliding_window": None},
    "smollm3_rope_in_every_layer": {"model_type": "smollm3", "architectures": ["SmolLM3ForCausalLM"],
                                    "no_rope_layers": [1] * TINY.num_layers, "use_sliding_window": False},
    "granite_with_llama_multipliers": {"model_type": "granite", "architectures": ["GraniteForCausalLM"],
                                       "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
                                       "logits_scaling": 1.0, "attention_multiplier": HEAD_DIM ** -0.5},
    "llama3_rope_scaling": {"model_type": "llama", "rope_scaling": LLAMA3, "max_position_embeddings": 2048},
}
"""Config edits of the tiny Llama that this forward computes: name → keys to set."""

REFUSED = [
    ("phi3", {"model_type": "phi3"}, "model_type 'phi3'"),
    ("olmo2", {"model_type": "olmo2"}, "model_type 'olmo2'"),
    ("mixtral", {"model_type": "mixtral"}, "model_type 'mixtral'"),
    ("unknown class", {"architectures": ["QWenLMHeadModel"]}, "model_type 'QWenLMHeadModel'"),
    ("llama3 rope scaling on another model", {"model_type": "mistral", "sliding_window": None,
                                              "rope_scaling": LLAMA3}, "rope_scaling type 'llama3'"),
    ("old-style linear scaling", {"rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling type 'linear'"),
    ("yarn in rope_parameters", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters type 'yarn'"),
    ("gelu", {"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh'"),
    ("partial rotary", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("sliding window on a llama", {"use_sliding_window": True, "sliding_window": 4}, "sliding_window 4"),
    ("gemma 3 bidirectional", {"model_type": "gemma3_text", "use_bidirectional_attention": True},
     "use_bidirectional_attention"),
    ("smollm3 odd no_rope_layers", {"model_type": "smollm3", "no_rope_layers": [1, 2]}, "no_rope_layers"),
    ("gemma 2 linear rope per layer type", {"model_type": "gemma2", "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e4},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rope_type|type 'linear'"),
]
"""Config edits of the tiny Llama this forward would compute wrongly: (case, keys, message)."""


def write_case(folder, name):
    """The tiny Llama (untied head) as a Hugging Face folder with the config of ACCEPTED[name]."""
    folder.mkdir(parents=True)
    _write_hf(folder, tiny_weights(tied=False))
    _edit_config(folder, {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None,   # the defaults'
                          **ACCEPTED[name]})                                      # lie past its vocabulary


def _edit_config(folder, keys):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(keys)
    path.write_text(json.dumps(config))


def _tiny_folder(folder, keys=None, extra_tensors=None):
    folder.mkdir(parents=True)
    weights = tiny_weights(tied=False)
    _write_hf(folder, weights)
    _edit_config(folder, keys or {})
    if extra_tensors:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        save_file({**tensors, **extra_tensors}, str(folder / "model.safetensors"))
    return folder


def test_unsupported_model_error_is_a_checkpoint_error():
    assert issubclass(UnsupportedModelError, CheckpointError) and issubclass(UnsupportedModelError, OSError)


@pytest.mark.parametrize("case, keys, match", REFUSED, ids=[case for case, _, _ in REFUSED])
def test_hugging_face_configs_this_forward_would_get_wrong_are_refused(tmp_path, case, keys, match):
    folder = _tiny_folder(tmp_path / "model", keys)
    with pytest.raises(UnsupportedModelError, match=match):
        LlamaModel.from_hf(folder, quant_type=None)


@pytest.mark.parametrize("tensor", ["model.layers.0.self_attn.q_proj.bias",         # Qwen2's q/k/v biases
                                    "model.layers.1.mlp.down_proj.bias",            # mlp_bias
                                    "model.layers.0.self_attn.q_norm.weight",       # Qwen3's q/k norms
                                    "model.layers.0.post_feedforward_layernorm.weight"])   # Gemma 2's
def test_tensors_the_model_would_not_read_are_refused(tmp_path, tensor):
    extra = {tensor: np.ones(HEAD_DIM if "norm" in tensor else TINY.hidden_size, np.float32)}
    folder = _tiny_folder(tmp_path / "model", extra_tensors=extra)
    with pytest.raises(UnsupportedModelError, match=tensor.replace(".", r"\.")):
        LlamaModel.from_hf(folder, quant_type=None)


def test_a_bitsandbytes_folder_with_a_tensor_the_model_would_not_read_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from qlora_np.io.bnb import save_bnb_model

    save_bnb_model(LlamaModel.from_weights(TINY, tiny_weights(), quant_type="nf4"), tmp_path / "ckpt")
    LlamaModel.from_hf(tmp_path / "ckpt")                                   # as saved: loads
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, "model.layers.0.self_attn.k_proj.bias": np.ones(16, np.float32)}, str(path))
    with pytest.raises(UnsupportedModelError, match="k_proj.bias"):
        LlamaModel.from_hf(tmp_path / "ckpt")


def test_old_checkpoints_rotary_buffers_are_not_weights(tmp_path):
    inv_freq = 1.0 / TINY.rope_theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM)
    extra = {f"model.layers.{n}.self_attn.rotary_emb.inv_freq": inv_freq for n in range(TINY.num_layers)}
    folder = _tiny_folder(tmp_path / "model", extra_tensors=extra)
    plain = _tiny_folder(tmp_path / "plain")
    ids = np.array(IDS)
    np.testing.assert_array_equal(LlamaModel.from_hf(folder, quant_type=None).forward(ids),
                                  LlamaModel.from_hf(plain, quant_type=None).forward(ids))


def transformers_logits(folder, ids):
    """transformers' float32 logits (T, vocab) for ``ids`` on the Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].numpy()


def _cases():
    """(case, ids) of every recorded comparison: each accepted config on 16 positions, and the
    rope-scaled one on 1,100 as well."""
    return [(name, IDS) for name in ACCEPTED] + [("llama3_rope_scaling_long", LONG_IDS)]


def _our_logits(folder, ids):
    """Our float32 logits for ``ids``: one forward for 16 positions; for the long input a prefill
    of 1,000 positions and then a token at a time through the KV cache, as decoding runs."""
    model = LlamaModel.from_hf(folder, quant_type=None)
    if len(ids) <= len(IDS):
        return model.forward(np.array(ids))
    cache = KVCache(model.config, len(ids))
    rows = [model.forward(np.array(ids[:1000]), cache=cache)]
    rows += [model.forward(np.array(ids[t:t + 1]), cache=cache) for t in range(1000, len(ids))]
    return np.concatenate(rows)


@pytest.mark.parametrize("case, ids", _cases(), ids=[case for case, _ in _cases()])
def test_accepted_configs_give_transformers_logits(tmp_path, case, ids):
    name = case.removesuffix("_long")
    write_case(tmp_path / name, name)
    np.testing.assert_allclose(_our_logits(tmp_path / name, ids), np.load(RECORDED)[case], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case, ids", _cases(), ids=[case for case, _ in _cases()])
def test_accepted_configs_give_transformers_logits_live(tmp_path, case, ids):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    name = case.removesuffix("_long")
    write_case(tmp_path / name, name)
    expected = transformers_logits(tmp_path / name, ids)
    np.testing.assert_allclose(_our_logits(tmp_path / name, ids), expected, atol=1e-4, rtol=0)


def test_llama3_rope_scaling_changes_the_long_logits(tmp_path):
    """The recorded long logits tell scaled RoPE from plain RoPE (so the test above can fail)."""
    write_case(tmp_path / "scaled", "llama3_rope_scaling")
    plain = LlamaModel.from_hf(tmp_path / "scaled", quant_type=None)
    plain.config = replace(plain.config, rope_freq_factors=(), rope_scaling=())
    logits = plain.forward(np.array(LONG_IDS))
    assert np.abs(logits - np.load(RECORDED)["llama3_rope_scaling_long"]).max() > 1e-2


def test_llama3_rope_scaling_needs_its_parameters(tmp_path):
    folder = _tiny_folder(tmp_path / "model", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(CheckpointError, match="needs numbers"):
        LlamaModel.from_hf(folder, quant_type=None)
    folder = _tiny_folder(tmp_path / "inverted", {"rope_scaling": {**LLAMA3, "low_freq_factor": 5.0}})
    with pytest.raises(CheckpointError, match="low_freq_factor < high_freq_factor"):
        LlamaModel.from_hf(folder, quant_type=None)


def _gguf(path, architecture="llama", weights=None, **metadata):
    """The tiny Llama as a GGUF of ``architecture`` with extra metadata (key → value)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in {"llama.block_count": TINY.num_layers, "llama.context_length": TINY.context_length,
                       "llama.embedding_length": TINY.hidden_size,
                       "llama.feed_forward_length": TINY.intermediate_size,
                       "llama.attention.head_count": TINY.num_heads,
                       "llama.attention.head_count_kv": TINY.num_kv_heads,
                       "llama.rope.freq_base": TINY.rope_theta,
                       "llama.attention.layer_norm_rms_epsilon": TINY.rms_norm_eps,
                       "llama.vocab_size": TINY.vocab_size, **metadata}.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, value in (weights or tiny_weights()).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_tiny_gguf_writer_writes_a_model_that_loads(tmp_path):
    ids = np.array(IDS)
    np.testing.assert_array_equal(LlamaModel.from_gguf(_gguf(tmp_path / "m.gguf"), quant_type=None).forward(ids),
                                  LlamaModel.from_weights(TINY, tiny_weights(), quant_type=None).forward(ids))


@pytest.mark.parametrize("metadata, match", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, "rope.scaling.type 'linear'"),
    ({"llama.rope.scaling.factor": 8.0}, "rope.scaling.factor 8.0"),
    ({"llama.expert_count": 8}, "8 experts"),
    ({"llama.rope.dimension_count": HEAD_DIM // 2}, "rope.dimension_count"),
    ({"llama.attention.key_length": 2 * HEAD_DIM}, "key_length"),
])
def test_gguf_metadata_this_forward_would_get_wrong_is_refused(tmp_path, metadata, match):
    path = _gguf(tmp_path / "model.gguf", **metadata)
    with pytest.raises(UnsupportedModelError, match=match):
        LlamaModel.from_gguf(path, quant_type=None)


@pytest.mark.parametrize("architecture", ["qwen2", "gemma2", "phi3", "mistral"])
def test_gguf_of_another_architecture_is_refused(tmp_path, architecture):
    path = _gguf(tmp_path / "model.gguf", architecture)
    with pytest.raises(UnsupportedModelError, match=f"architecture '{architecture}'"):
        LlamaModel.from_gguf(path, quant_type=None)


@pytest.mark.parametrize("tensor, shape", [("blk.0.ffn_gate_exps.weight", (4, 48, 32)),     # Mixtral's experts
                                           ("blk.0.attn_q.bias", (TINY.hidden_size,)),
                                           ("blk.1.attn_k_norm.weight", (HEAD_DIM,))])
def test_gguf_tensors_the_model_would_not_read_are_refused(tmp_path, tensor, shape):
    path = _gguf(tmp_path / "model.gguf", weights={**tiny_weights(), tensor: np.ones(shape, np.float32)})
    with pytest.raises(UnsupportedModelError, match=tensor.replace(".", r"\.")):
        LlamaModel.from_gguf(path, quant_type=None)


def test_gguf_tensors_that_disagree_with_the_metadata_are_a_checkpoint_error(tmp_path):
    path = _gguf(tmp_path / "model.gguf", **{"llama.attention.head_count_kv": 1})   # tensors are for 2
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_k\.weight.*shape"):
        LlamaModel.from_gguf(path, quant_type=None)
    weights = tiny_weights()
    del weights["blk.1.ffn_up.weight"]
    with pytest.raises(CheckpointError, match=r"no tensor 'blk\.1\.ffn_up\.weight'"):
        LlamaModel.from_gguf(_gguf(tmp_path / "missing.gguf", weights=weights), quant_type=None)


def _llama3_factors():
    scaling = [LLAMA3[key] for key in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings")]
    return np.array(llama3_frequency_factors(HEAD_DIM, TINY.rope_theta, *scaling), np.float32)


def test_a_gguf_with_rope_freqs_computes_llama3_rope_scaling(tmp_path):
    """llama.cpp's Llama 3.x GGUFs carry the scaling as rope_freqs.weight, the divisor of each
    frequency: loaded so, the model gives the logits of the Hugging Face config it came from."""
    factors = _llama3_factors()
    assert sorted(set(np.round(factors, 4).tolist())) != [1.0] and factors.max() == 8.0    # all three bands
    weights = {**tiny_weights(tied=False), "rope_freqs.weight": factors}
    path = _gguf(tmp_path / "llama3.gguf", weights=weights, **{"llama.context_length": 2048})
    from_gguf = LlamaModel.from_gguf(path, quant_type=None)
    write_case(tmp_path / "hf", "llama3_rope_scaling")
    from_hf = LlamaModel.from_hf(tmp_path / "hf", quant_type=None)
    ids = np.array(LONG_IDS[:300])
    np.testing.assert_allclose(from_gguf.forward(ids), from_hf.forward(ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("factors, match", [(np.ones(HEAD_DIM, np.float32), "shape"),
                                            (np.array([1, 2, -1, 8], np.float32), "positive"),
                                            (np.array([1, 2, np.nan, 8], np.float32), "positive")])
def test_malformed_rope_freqs_are_a_checkpoint_error(tmp_path, factors, match):
    path = _gguf(tmp_path / "m.gguf", weights={**tiny_weights(), "rope_freqs.weight": factors})
    with pytest.raises(CheckpointError, match=match):
        LlamaModel.from_gguf(path, quant_type=None)


def test_llama3_rope_scaling_survives_the_writers(tmp_path):
    from qlora_np.io.bnb import save_bnb_model, save_merged_hf
    from qlora_np.io.gguf_export import save_merged_gguf

    write_case(tmp_path / "hf", "llama3_rope_scaling")
    model = LlamaModel.from_hf(tmp_path / "hf", quant_type=None)
    ids = np.array(LONG_IDS[:200])
    expected = model.forward(ids)
    config = save_merged_hf(model, tmp_path / "merged", "F32")
    assert config["rope_scaling"] == LLAMA3
    np.testing.assert_array_equal(LlamaModel.from_hf(tmp_path / "merged", quant_type=None).forward(ids), expected)
    base = _gguf(tmp_path / "base.gguf", weights={**tiny_weights(tied=False), "rope_freqs.weight": _llama3_factors()})
    save_merged_gguf(model, base, tmp_path / "merged.gguf", "F32")
    np.testing.assert_allclose(LlamaModel.from_gguf(tmp_path / "merged.gguf", quant_type=None).forward(ids),
                               expected, atol=2e-5, rtol=0)
    from_gguf = LlamaModel.from_gguf(base, quant_type="nf4")      # factors without their parameters
    with pytest.raises(UnsupportedModelError, match="frequency factors"):
        save_bnb_model(from_gguf, tmp_path / "ckpt")


def test_training_sees_the_same_rope_scaling_as_inference(tmp_path):
    from qlora_np.models.llama.lora import inject_lora, loss_and_backward

    write_case(tmp_path / "hf", "llama3_rope_scaling")
    model = LlamaModel.from_hf(tmp_path / "hf", quant_type=None)
    inject_lora(model, "all-linear", r=4, alpha=8)
    ids = np.array(LONG_IDS[:600])
    labels = np.roll(ids, -1)
    logits = model.forward(ids).astype(np.float64)                                # (T, vocab)
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    expected = -log_probs[np.arange(ids.size), labels].mean()
    model.train()
    assert abs(loss_and_backward(model, ids[None], labels[None]) - expected) < 1e-4


FINETUNED = {
    "qwen2": dict(model_type="qwen2", biases=("attn_q", "attn_k", "attn_v"), layer_windows=(0, 8)),
    "gemma2": dict(model_type="gemma2", norm_plus_one=True, embedding_scale=32 ** 0.5, activation="gelu_tanh",
                   post_norms=True, attention_scale=12 ** -0.5, attention_softcap=50.0, final_softcap=30.0,
                   layer_windows=(8, 0)),
}
"""Architectures the command line fine-tunes in the test below: LlamaConfig switches."""


def _random_folder(folder, config, tokenizer):
    """A random model of ``config`` (tied head) written as a Hugging Face folder with SmolLM2's tokenizer."""
    from qlora_np.io.bnb import save_merged_hf
    from qlora_np.models.llama.names import gguf_tensor_shapes

    from .test_llama import write_hf_tokenizer

    rng = np.random.default_rng(0)
    weights = {}
    for name, shape in gguf_tensor_shapes(config, tied=True).items():
        values = rng.standard_normal(shape) / np.sqrt(shape[-1]) if len(shape) == 2 else 0.1 * rng.standard_normal(shape)
        weights[name] = (values + ("norm" in name)).astype(np.float32)
    save_merged_hf(LlamaModel.from_weights(config, weights, quant_type=None), folder, "F32")
    write_hf_tokenizer(folder, tokenizer)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("architecture", FINETUNED)
def test_the_command_line_fine_tunes_these_architectures_and_peft_loads_the_result(
        tmp_path, architecture, smollm2_tokenizer):
    from qlora_np import cli
    from qlora_np.io.peft import load_peft
    from qlora_np.train.checkpoint import latest_checkpoint

    from .test_train import TINY_VOCAB

    config = replace(TINY_VOCAB, **FINETUNED[architecture])
    folder = _random_folder(tmp_path / "base", config, smollm2_tokenizer)
    assert LlamaModel.from_hf(folder, quant_type=None).config == config           # read back as written
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"The {word} is here and the {word} stays."}) + "\n"
                            for word in ("apple", "river", "stone", "cloud", "ember", "maple")))
    assert cli.main(["finetune", str(folder), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                     "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--target-modules", "all-linear"]) == 0
    checkpoint = latest_checkpoint(tmp_path / "run")
    ours = LlamaModel.from_hf(folder, quant_type=None)
    load_peft(ours, checkpoint)
    ids = np.array(smollm2_tokenizer.encode("The river is here"))
    logits = ours.forward(ids)
    assert np.abs(logits - LlamaModel.from_hf(folder, quant_type=None).forward(ids)).max() > 1e-4   # it learned
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, checkpoint).eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
