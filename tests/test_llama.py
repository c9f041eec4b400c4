"""The Llama model: llama.cpp's token ids and logits, KV-cache generation, sampling."""

import json
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qlora_np.errors import InvalidValueError, ShapeError
from qlora_np.models.llama.model import KVCache, LlamaModel, sample
from qlora_np.models.llama.reference import causal_attention
from qlora_np.models.llama.config import LlamaConfig

from .gradcheck import numeric_gradient

LLAMACPP_DIR = pathlib.Path(__file__).parent / "data" / "llamacpp"
TINY = LlamaConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=48, rope_theta=10000.0, rms_norm_eps=1e-5, context_length=64)


def tiny_weights(config=TINY, seed=0, tied=True):
    rng = np.random.default_rng(seed)
    h, f, kv = config.hidden_size, config.intermediate_size, config.num_kv_heads * config.head_dim
    shapes = {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
              "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    weights = {"token_embd.weight": rng.standard_normal((config.vocab_size, h)).astype(np.float32),
               "output_norm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)}
    if not tied:
        weights["output.weight"] = rng.standard_normal((config.vocab_size, h)).astype(np.float32) * 0.2
    for layer in range(config.num_layers):
        for name, shape in shapes.items():
            weights[f"blk.{layer}.{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        for name in ("attn_norm", "ffn_norm"):
            weights[f"blk.{layer}.{name}.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    return weights


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_kv_cache_steps_equal_one_full_forward(quant_type):
    model = LlamaModel.from_weights(TINY, tiny_weights(), quant_type=quant_type)
    ids = np.array([3, 17, 5, 29, 11, 2, 38])
    full = model.forward(ids)
    cache = KVCache(TINY, 16)
    pieces = [model.forward(ids[:3], cache), model.forward(ids[3:4], cache), model.forward(ids[4:], cache)]
    np.testing.assert_allclose(np.concatenate(pieces), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 7


def test_fused_projections_follow_replaced_weights():
    model = LlamaModel.from_weights(TINY, tiny_weights(), quant_type="nf4", blocksize=32)  # fused: in % 32 == 0
    other = LlamaModel.from_weights(TINY, tiny_weights(seed=1), quant_type="nf4", blocksize=32)
    ids = np.array([3, 17, 5])
    before = model.forward(ids)
    for block, other_block in zip(model.blocks, other.blocks):
        for name in ("attn_q", "ffn_up", "attn_output"):
            block.linears[name].base = other_block.linears[name].base
    after = model.forward(ids)
    fresh = LlamaModel(TINY, model.embedding, model.blocks, model.output_norm, model.output)
    np.testing.assert_array_equal(after, fresh.forward(ids))               # nothing stale was used
    assert not np.allclose(after, before)


def test_causal_attention_matches_a_per_head_loop():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, 3, 8)).astype(np.float32)           # 4 heads, 3 new positions
    keys = rng.standard_normal((2, 5, 8)).astype(np.float32)        # 2 kv heads, 5 positions
    values = rng.standard_normal((2, 5, 8)).astype(np.float32)
    positions = np.array([2, 3, 4])
    out = causal_attention(q, keys, values, positions)
    for h in range(4):
        for t, pos in enumerate(positions):
            k, v = keys[h // 2, :pos + 1], values[h // 2, :pos + 1]
            scores = k @ q[h, t] / np.sqrt(8)
            w = np.exp(scores - scores.max())
            np.testing.assert_allclose(out[h, t], (w / w.sum()) @ v, rtol=1e-5, atol=1e-6)


def test_untied_output_and_bad_ids():
    model = LlamaModel.from_weights(TINY, tiny_weights(tied=False), quant_type=None)
    assert model.forward(np.array([1, 2])).shape == (2, TINY.vocab_size)
    with pytest.raises(InvalidValueError, match=r"token ids must be in \[0, 40\)"):
        model.forward(np.array([40]))
    with pytest.raises(ShapeError):
        model.forward(np.array([], np.int64))
    with pytest.raises(InvalidValueError, match="KV cache holds 2 positions"):
        model.forward(np.array([1, 2, 3]), KVCache(TINY, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_refuses_ids_and_labels_outside_the_vocabulary(dtype):
    from qlora_np.models.llama.lora import IGNORE_INDEX, loss_and_backward, summed_loss
    model = LlamaModel.from_weights(TINY, tiny_weights(), quant_type=None)
    ids, labels = np.array([[1, 2, 3]]), np.array([[2, 3, IGNORE_INDEX]])
    assert np.isfinite(loss_and_backward(model, ids, labels, dtype=dtype))
    with pytest.raises(InvalidValueError, match=r"labels\[0, 1\] = 40 is not a token id .*0 … 39, or ignore"):
        loss_and_backward(model, ids, np.array([[2, 40, 1]]), dtype=dtype)
    with pytest.raises(InvalidValueError, match=r"ids\[0, 0\] = -1 is not a token id"):
        summed_loss(model, np.array([[-1, 2, 3]]), labels, dtype=dtype)
    with pytest.raises(InvalidValueError, match="integer token ids"):
        loss_and_backward(model, ids.astype(np.float32), labels, dtype=dtype)


def test_sampling():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    assert sample(logits) == 1
    rng = np.random.default_rng(0)
    draws = [sample(logits, temperature=1.0, top_k=2, rng=rng) for _ in range(300)]
    assert set(draws) == {1, 2}
    draws = [sample(logits, temperature=1.0, top_p=0.4, rng=rng) for _ in range(50)]
    assert set(draws) == {1}
    a = [sample(logits, 0.8, rng=np.random.default_rng(5)) for _ in range(3)]
    assert a == [sample(logits, 0.8, rng=np.random.default_rng(5)) for _ in range(3)]


def test_generation_is_deterministic_and_stops():
    model = LlamaModel.from_weights(TINY, tiny_weights(), quant_type="nf4")
    first = list(model.generate([1, 2, 3], max_new_tokens=6))
    assert first == list(model.generate([1, 2, 3], max_new_tokens=6)) and len(first) == 6
    sampled = list(model.generate([1, 2, 3], max_new_tokens=6, temperature=1.0, seed=3))
    assert sampled == list(model.generate([1, 2, 3], max_new_tokens=6, temperature=1.0, seed=3))


# ---------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (slow: loads and decodes 135 M parameters)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_path():
    from qlora_np.demo import ModelNotFoundError, shipped_smollm2_path
    try:
        return shipped_smollm2_path()
    except ModelNotFoundError as error:
        pytest.fail(f"the real model is part of the test set-up: {error}")


@pytest.mark.slow
def test_tokenizer_ids_equal_llama_cpp(smollm2_path):
    import gguf

    from qlora_np.models.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(smollm2_path))
    recorded = json.loads((LLAMACPP_DIR / "tokens.json").read_text())["tokens"]
    assert len(recorded) >= 10
    for text, ids in recorded.items():
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == text
    assert sorted(tokenizer.end_ids) == [0, 2, 4]                     # llama.cpp's end-of-generation set


def write_hf_tokenizer(folder, tokenizer):
    """SmolLM2-Instruct's tokenizer files as its Hugging Face folder has them."""
    import gguf

    from qlora_np.demo import shipped_smollm2_path
    from qlora_np.io.gguf import field_value

    tokenizer._hf.save(str(folder / "tokenizer.json"))
    template = field_value(gguf.GGUFReader(shipped_smollm2_path()), "tokenizer.chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
        "unk_token": "<|endoftext|>", "model_max_length": 8192, "chat_template": template}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def test_hugging_face_tokenizer_files_give_the_gguf_tokenizer(tmp_path, smollm2_tokenizer):
    from qlora_np.errors import CheckpointError
    from qlora_np.models.tokenizer import Tokenizer

    assert Tokenizer.from_hf_folder(tmp_path) is None                      # no tokenizer.json
    write_hf_tokenizer(tmp_path, smollm2_tokenizer)
    from_hf = Tokenizer.from_hf_folder(tmp_path)
    for text in json.loads((LLAMACPP_DIR / "tokens.json").read_text())["tokens"]:
        assert from_hf.encode(text) == smollm2_tokenizer.encode(text), text
    chat = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Add 12 and 30."}])
    assert from_hf.encode(chat) == smollm2_tokenizer.encode(chat)
    assert (from_hf.bos_id, from_hf.eos_id, from_hf.end_ids, from_hf.add_bos, from_hf.vocab_size) == (
        1, 2, smollm2_tokenizer.end_ids, False, smollm2_tokenizer.vocab_size)
    assert from_hf.special_tokens == smollm2_tokenizer.special_tokens
    assert from_hf.chat_template == smollm2_tokenizer.chat_template
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "chat_template.jinja").write_text(settings.pop("chat_template"), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))       # as transformers 5 writes it
    assert Tokenizer.from_hf_folder(tmp_path).chat_template == smollm2_tokenizer.chat_template
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


def test_a_saved_tokenizer_reads_back_the_same(tmp_path, smollm2_tokenizer):
    from qlora_np.models.tokenizer import Tokenizer

    smollm2_tokenizer.save_hf(tmp_path)
    again = Tokenizer.from_hf_folder(tmp_path)
    text = "<|im_start|>user\nWrite 2024-03-07 in words: héllo 12345<|im_end|>\n"
    assert again.encode(text) == smollm2_tokenizer.encode(text)
    assert (again.bos_id, again.eos_id, again.end_ids, again.add_bos, again.chat_template_text) == (
        smollm2_tokenizer.bos_id, smollm2_tokenizer.eos_id, smollm2_tokenizer.end_ids, smollm2_tokenizer.add_bos,
        smollm2_tokenizer.chat_template_text)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"


json_settings = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 40) | st.sampled_from(
    ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "nope", "{{ '<|im_start|>system\\nHi<|im_end|>' }}"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["content", "name", "template", "eos_token", "bos_token", "chat_template",
                         "add_bos_token", "eos_token_id"]), inner, max_size=4), max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(settings_json=json_settings, generation_json=json_settings)
def test_any_tokenizer_settings_load_or_raise_a_checkpoint_error(tmp_path_factory, smollm2_tokenizer,
                                                                  settings_json, generation_json):
    from qlora_np.errors import CheckpointError
    from qlora_np.models.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tok")
    smollm2_tokenizer._hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(settings_json))
    (folder / "generation_config.json").write_text(json.dumps(generation_json))
    try:
        tokenizer = Tokenizer.from_hf_folder(folder)
    except CheckpointError:
        return
    assert tokenizer.eos_id in tokenizer.end_ids
    assert all(type(i) is int and 0 <= i < tokenizer.vocab_size for i in tokenizer.end_ids)
    asks_for_bos = isinstance(settings_json, dict) and settings_json.get("add_bos_token") is True
    bos = [tokenizer.bos_id] if asks_for_bos else []
    assert tokenizer.encode("Hi 12") == bos + smollm2_tokenizer.encode("Hi 12")


@pytest.mark.parametrize("source, default_system", [
    (None, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ("{{ '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{% for m in messages %}…", "You are Qwen."),
    ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>'}}", None),
])
def test_chatml_templates_keep_their_own_default_system_turn(source, default_system):
    from qlora_np.models.tokenizer import ChatTemplate

    template = ChatTemplate.from_source(source)
    assert template.default_system == default_system
    rendered = template.render([{"role": "user", "content": "Hi"}])
    assert rendered.startswith("<|im_start|>system\n" if default_system else "<|im_start|>user\nHi")


def test_other_chat_templates_are_refused_not_rendered_as_chatml(tmp_path, smollm2_tokenizer):
    from qlora_np.train.data import tokenize_record
    from qlora_np.errors import UnknownFormatError
    from qlora_np.models.tokenizer import Tokenizer

    write_hf_tokenizer(tmp_path, smollm2_tokenizer)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings["chat_template"] = [{"name": "default", "template": "{% for m in messages %}[INST] {{ m.content }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = Tokenizer.from_hf_folder(tmp_path)
    with pytest.raises(UnknownFormatError, match="not ChatML"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    with pytest.raises(UnknownFormatError, match="not ChatML"):
        tokenize_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                        tokenizer)
    assert tokenize_record({"prompt": "a", "completion": "b"}, tokenizer).targets.any()


@pytest.mark.slow
def test_float_forward_matches_llama_cpp_logits(smollm2_path):
    model = LlamaModel.from_gguf(smollm2_path, quant_type=None)
    with np.load(LLAMACPP_DIR / "logits.npz") as recorded:
        for index in range(2):
            ids = recorded[f"ids_{index}"]
            logits = model.forward(ids)
            # llama.cpp ran the all-F32 copy with an F32 KV cache: only summation order differs
            assert np.abs(logits[-1] - recorded[f"last_logits_{index}"]).max() < 2e-3
            np.testing.assert_array_equal(logits.argmax(axis=1), recorded[f"argmax_{index}"])
            np.testing.assert_allclose(logits.max(axis=1), recorded[f"max_{index}"], atol=2e-3)


@pytest.mark.slow
def test_nf4_model_knows_the_capital_of_france(smollm2_path):
    model = LlamaModel.from_gguf(smollm2_path, quant_type="nf4")
    text = "".join(model.generate("The capital of France is", max_new_tokens=8))
    assert "Paris" in text
    answer = "".join(model.generate("What is the capital of France?", max_new_tokens=16, chat=True))
    assert "Paris" in answer


@pytest.mark.slow
def test_int8_activations_stay_close_to_the_exact_products(smollm2_path):
    model = LlamaModel.from_gguf(smollm2_path, quant_type="nf4")
    ids = np.array(model.tokenizer.encode(
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
        "named after the engineer Gustave Eiffel, whose company designed and built the tower."))
    exact = model.forward(ids)                                  # ≤ 64 tokens: the fused products
    model.int8_activations = True
    approximate = model.forward(ids)
    # seen: logits 4.5–6 % off the exact NF4 products (NF4 itself is ~30 % off the float
    # model), the same next-token loss to ±0.01, top-1 agreement 87.5–95 % of the 40 positions
    # (near-ties flip: attention is fastmath, and a freshly compiled copy differs from the
    # cached one by ~1e-7, which moves 2 of 40 argmaxes)
    assert np.linalg.norm(approximate - exact) <= 0.1 * np.linalg.norm(exact)
    assert abs(_next_token_loss(approximate, ids) - _next_token_loss(exact, ids)) < 0.03
    assert (approximate.argmax(axis=1) == exact.argmax(axis=1)).mean() >= 0.85
    assert "Paris" in "".join(model.generate("The capital of France is", max_new_tokens=8))


def _next_token_loss(logits, ids):
    shifted = logits[:-1].astype(np.float64) - logits[:-1].max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(ids) - 1), ids[1:]].mean()


# ---------------------------------------------------------------------------
# LoRA through the whole model
# ---------------------------------------------------------------------------

def _lora_model(weights, quant_type):
    from qlora_np.models.llama.lora import inject_lora

    model = LlamaModel.from_weights(TINY, weights, quant_type=quant_type)
    params = inject_lora(model, "all-linear", r=2, alpha=4, seed=1, dtype=np.float64)
    rng = np.random.default_rng(2)
    for param in params.values():                                  # non-zero B: every path live
        param.value[...] = rng.standard_normal(param.value.shape) * 0.3
    return model, params


def _batch():
    from qlora_np.models.llama.lora import IGNORE_INDEX

    rng = np.random.default_rng(3)
    ids = rng.integers(0, TINY.vocab_size, (2, 5))
    labels = rng.integers(0, TINY.vocab_size, (2, 5))
    labels[0, 1] = labels[1, 4] = IGNORE_INDEX
    return ids, labels


def _gradients(model, params, ids, labels):
    from qlora_np.models.llama.lora import loss_and_backward

    loss = loss_and_backward(model, ids, labels, dtype=np.float64)
    grads = {name: p.grad.copy() for name, p in params.items()}
    for param in params.values():
        param.grad = None
    return loss, grads


def test_whole_model_lora_gradients_match_finite_differences():
    from qlora_np.models.llama.lora import loss_and_backward, trainable_parameters

    model, params = _lora_model(tiny_weights(tied=False), quant_type=None)
    ids, labels = _batch()

    def loss():
        return loss_and_backward_no_grad(model, ids, labels)

    def loss_and_backward_no_grad(model, ids, labels):
        value = loss_and_backward(model, ids, labels, dtype=np.float64)
        for param in trainable_parameters(model).values():
            param.grad = None
        return value

    _, grads = _gradients(model, params, ids, labels)
    checked = ["blk.0.attn_q.lora_a", "blk.0.attn_k.lora_b", "blk.1.attn_v.lora_a",
               "blk.0.attn_output.lora_b", "blk.1.ffn_gate.lora_a", "blk.0.ffn_up.lora_b",
               "blk.1.ffn_down.lora_a"]
    for name in checked:
        numeric = numeric_gradient(loss, params[name].value)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-4, atol=1e-7, err_msg=name)


def test_nf4_model_gradients_equal_those_of_its_decoded_float_twin():
    # the 4-bit products run in float32, too coarse for float64 finite differences; the
    # float twin (same decoded weights, checked by finite differences above) must agree
    import qlora_np

    weights = tiny_weights(tied=False)
    quantized, params = _lora_model(weights, "nf4")
    decoded = dict(weights)
    for index, block in enumerate(quantized.blocks):
        for name, layer in block.linears.items():
            decoded[f"blk.{index}.{name}.weight"] = qlora_np.dequantize(layer.base)
    decoded["output.weight"] = qlora_np.dequantize(quantized.output.base)
    twin, twin_params = _lora_model(decoded, None)
    ids, labels = _batch()
    loss, grads = _gradients(quantized, params, ids, labels)
    twin_loss, twin_grads = _gradients(twin, twin_params, ids, labels)
    assert loss == pytest.approx(twin_loss, rel=1e-5)
    for name in grads:
        np.testing.assert_allclose(grads[name], twin_grads[name], rtol=1e-3, atol=1e-5, err_msg=name)


def test_inject_lora_names_and_counts():
    from qlora_np.errors import UnknownFormatError
    from qlora_np.models.llama.lora import inject_lora, print_trainable_parameters

    model = LlamaModel.from_weights(TINY, tiny_weights(), quant_type="nf4")
    before = model.forward(np.array([1, 2, 3]))
    params = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert sorted(params) == sorted(f"blk.{i}.{n}.{ab}" for i in range(2) for n in ("attn_q", "attn_v")
                                    for ab in ("lora_a", "lora_b"))
    np.testing.assert_array_equal(model.forward(np.array([1, 2, 3])), before)   # B = 0
    lines = []
    trainable, total = print_trainable_parameters(model, out=lines.append)
    assert trainable == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert lines[0].startswith(f"trainable params: {trainable:,} || all params: {total:,}")
    with pytest.raises(UnknownFormatError, match="unknown target module 'qkv'"):
        inject_lora(model, ["qkv"])


@pytest.mark.slow
def test_lora_training_steps_lower_the_loss_of_the_real_model(smollm2_path):
    from qlora_np.models.llama.lora import inject_lora, loss_and_backward
    from qlora_np.nn.optim import AdamW

    model = LlamaModel.from_gguf(smollm2_path, quant_type="nf4")
    optimizer = AdamW(inject_lora(model, ["q_proj", "v_proj"], r=8, alpha=16), lr=2e-3)
    ids = np.array(model.tokenizer.encode("The secret word of the qlora_np project is blue-giraffe."))
    losses = []
    for _ in range(3):
        losses.append(loss_and_backward(model, ids[None, :-1], ids[None, 1:]))
        optimizer.step()
        optimizer.zero_grad()
    assert losses[2] < losses[1] < losses[0]


# ---------------------------------------------------------------------------
# The same tiny model from a GGUF file and from a Hugging Face folder
# ---------------------------------------------------------------------------

def _write_gguf(path, weights, config=TINY):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for name, value in weights.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_hf(folder, weights, config=TINY):
    from safetensors.numpy import save_file

    from qlora_np.models.llama.names import HF_LINEAR_NAMES, unpermute_rope_rows

    tensors = {"model.embed_tokens.weight": weights["token_embd.weight"],
               "model.norm.weight": weights["output_norm.weight"]}
    if "output.weight" in weights:
        tensors["lm_head.weight"] = weights["output.weight"]
    for layer in range(config.num_layers):
        for name, hf_name in HF_LINEAR_NAMES.items():
            weight = weights[f"blk.{layer}.{name}.weight"]
            heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}.get(name)
            tensors[f"model.layers.{layer}.{hf_name}.weight"] = (
                weight if heads is None else unpermute_rope_rows(weight, heads))
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = weights[f"blk.{layer}.attn_norm.weight"]
        tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = weights[f"blk.{layer}.ffn_norm.weight"]
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "intermediate_size": config.intermediate_size,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.context_length, "tie_word_embeddings": "output.weight" not in weights}))


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_and_hugging_face_loading_of_the_same_model_agree(tmp_path, tied):
    from qlora_np.models.llama.names import permute_rope_rows, unpermute_rope_rows

    weights = tiny_weights(tied=tied)
    _write_gguf(tmp_path / "tiny.gguf", weights)
    (tmp_path / "hf").mkdir()
    _write_hf(tmp_path / "hf", weights)
    from_gguf = LlamaModel.from_gguf(tmp_path / "tiny.gguf", quant_type=None)
    from_hf = LlamaModel.from_hf(tmp_path / "hf", quant_type=None)
    direct = LlamaModel.from_weights(TINY, weights, quant_type=None)
    ids = np.array([5, 1, 33, 7, 20, 9])
    expected = direct.forward(ids)
    np.testing.assert_array_equal(from_gguf.forward(ids), expected)
    np.testing.assert_array_equal(from_hf.forward(ids), expected)
    assert from_hf.tied_output == tied
    q = weights["blk.0.attn_q.weight"]
    np.testing.assert_array_equal(permute_rope_rows(unpermute_rope_rows(q, 4), 4), q)
    assert not np.array_equal(unpermute_rope_rows(q, 4), q)


def test_hugging_face_loading_reports_missing_files(tmp_path):
    from qlora_np.io.safetensors import CheckpointError

    with pytest.raises(CheckpointError, match="config.json"):
        LlamaModel.from_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    from qlora_np.io.safetensors import read_safetensors
    with pytest.raises(CheckpointError, match="does not fit"):
        read_safetensors(tmp_path / "model.safetensors")


@pytest.mark.parametrize("dropout, compute_dtype", [(0.0, "float32"), (0.3, "float32"), (0.3, "bfloat16")])
def test_gradient_checkpointing_gives_the_same_gradients(dropout, compute_dtype):
    from qlora_np.models.llama.lora import inject_lora, loss_and_backward

    results = []
    for checkpoint in (False, True):
        model = LlamaModel.from_weights(TINY, tiny_weights(), quant_type="nf4")
        model.set_compute_dtype(compute_dtype)                 # bfloat16: attention's products too
        params = inject_lora(model, "all-linear", r=2, alpha=4, dropout=dropout, seed=4)
        for index, param in enumerate(params.values()):
            param.value[...] = np.random.default_rng(index).standard_normal(param.value.shape) * 0.2
        ids, labels = _batch()
        loss = loss_and_backward(model, ids, labels, checkpoint=checkpoint)
        results.append((loss, {name: p.grad for name, p in params.items()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss == loss_ckpt
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads_ckpt[name], err_msg=name)


def test_missing_or_malformed_gguf_files_raise_checkpoint_errors(tmp_path):
    from qlora_np.io.safetensors import CheckpointError

    with pytest.raises(CheckpointError, match="no GGUF file"):
        LlamaModel.from_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(60)))
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        LlamaModel.from_gguf(tmp_path / "junk.gguf")


@st.composite
def _corrupted_gguf(draw):
    blob = bytearray(_TINY_GGUF_BYTES())
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(blob) - 1))
        blob[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(len(blob) // 2, len(blob)))
    return bytes(blob[:cut])


_CACHE = {}


def _TINY_GGUF_BYTES():
    if "blob" not in _CACHE:
        import tempfile
        with tempfile.TemporaryDirectory() as folder:
            path = pathlib.Path(folder) / "tiny.gguf"
            _write_gguf(path, tiny_weights())
            _CACHE["blob"] = path.read_bytes()
    return _CACHE["blob"]


@settings(max_examples=80, deadline=None)
@given(blob=_corrupted_gguf())
def test_corrupted_gguf_files_raise_qlora_errors_or_load(tmp_path_factory, blob):
    from qlora_np.errors import QLoraError

    path = tmp_path_factory.mktemp("gguf") / "corrupt.gguf"
    path.write_bytes(blob)
    try:
        LlamaModel.from_gguf(path, quant_type=None)
    except QLoraError:
        pass


def test_gguf_without_model_sizes_is_refused(tmp_path):
    import gguf

    from qlora_np.io.safetensors import CheckpointError

    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="llama.\\* metadata"):
        LlamaModel.from_gguf(tmp_path / "bare.gguf")


def _full_attention_and_gradients(q, k, v, mask, grad_out):
    """Unchunked attention and its gradients, by the textbook formulas (float64)."""
    group = q.shape[1] // k.shape[1]
    k_full, v_full = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.where(mask[:, None], q @ k_full.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]), -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs @ v_full
    grad_probs = grad_out @ v_full.transpose(0, 1, 3, 2)
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(axis=-1, keepdims=True)) / np.sqrt(q.shape[-1])
    shape = (k.shape[0], k.shape[1], group) + k.shape[2:]
    return (out, grad_scores @ k_full, (grad_scores.transpose(0, 1, 3, 2) @ q).reshape(shape).sum(axis=2),
            (probs.transpose(0, 1, 3, 2) @ grad_out).reshape(shape).sum(axis=2))


@pytest.mark.parametrize("packed", [False, True])
def test_training_attention_and_its_backward_follow_the_formulas(packed):
    from qlora_np.models.llama.lora import _attention, _attention_backward, _attention_mask

    rng = np.random.default_rng(0)
    B, H, KV, T, d = 2, 4, 2, 150, 8
    q, grad_out = rng.standard_normal((2, B, H, T, d))
    k, v = rng.standard_normal((2, B, KV, T, d))
    segments = np.repeat(np.arange(4), -(-T // 4))[None, :T].repeat(B, 0) if packed else None
    mask = _attention_mask(T, segments)

    def grouped(x):          # (B, H, T, d) → (B, KV, T·g, d), row t·g + j = head k·g + j at t
        return x.reshape(B, KV, H // KV, T, d).transpose(0, 1, 3, 2, 4).reshape(B, KV, -1, d)

    def by_head(x):
        return x.reshape(B, KV, T, H // KV, d).transpose(0, 1, 3, 2, 4).reshape(B, H, T, d)

    out, lse = _attention(grouped(q), k, v, mask)
    grad_q, grad_k, grad_v = _attention_backward(grouped(q), k, v, mask, lse, grouped(grad_out))
    expected = _full_attention_and_gradients(q, k, v, mask, grad_out)
    got = (by_head(out), by_head(grad_q), grad_k, grad_v)
    for name, got, want in zip(["out", "grad_q", "grad_k", "grad_v"], got, expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
