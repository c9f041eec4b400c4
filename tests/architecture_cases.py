"""The architecture matrix: tiny Hugging Face configs of every architecture the model computes
(or must refuse), where their recorded transformers + PEFT twins live, and the comparisons that
tests/test_architecture_matrix.py, benchmarks/architectures.py and the generator
(tests/data/architectures/make_model_vectors.py) share.

Each case is a transformers config.json as a Hub checkpoint would write it (model_type + sizes +
what the case exercises). Its folder under ``data/architectures/models/<case>/`` holds the model
saved by ``save_pretrained`` (random weights, every norm and bias perturbed so that conventions
such as Gemma's (1 + w) show), ``hub_config.json`` (the case's config as written here, which
transformers reads into the same model), a PEFT LoRA ``adapter/`` with random non-zero A and B,
and ``reference.npz``: transformers' logits, PEFT's logits and autograd gradients.

The functions below that need torch import it inside, so that the tests run without it.
"""

import pathlib
import re
import shutil
from typing import NamedTuple

import numpy as np

MODELS = pathlib.Path(__file__).parent / "data" / "architectures" / "models"

IDS = [5, 1, 33, 7, 20, 9, 2, 38, 11, 0, 17, 25, 3, 30, 14, 8]
LONG_IDS = np.random.default_rng(7).integers(0, 96, 1100).tolist()
LONG_ROWS = (0, 511, 1023, 1050, 1099)
"""The positions of the long input whose logits are recorded (the prefill's and the decoded ones)."""
PREFILL = 1000
"""How much of the long input our model takes in one forward; the rest goes token by token."""
LOGIT_ATOL = 1e-4
GRADIENT_RTOL = 1e-4
"""A gradient passes when max|ours − theirs| ≤ GRADIENT_RTOL · max|theirs|, per tensor."""
CONTRAST_MIN = 1e-2
"""How far (100× the tolerance) the logits of a contrast must lie from the reference."""
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}

SIZES = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 2048,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "initializer_range": 0.2, "torch_dtype": "float32",
         "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
"""What every case shares. rms_norm_eps and rope_theta are given, as Hub configs give them: their
defaults differ between transformers' config classes (1e-5 or 1e-6; 1e4, 1e6 or 2e6). The default
token ids of most configs lie past a vocabulary of 96; initializer_range 0.2 makes scores and
logits large enough (~1) for soft-caps and windows to show."""

ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
                 "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3", "smollm3": "SmolLM3",
                 "granite": "Granite", "olmo": "OLMo", "olmo2": "OLMo 2", "mixtral": "Mixtral",
                 "qwen2_moe": "Qwen2-MoE"}
"""model_type → the architecture's name, for the printed matrix."""


class Case(NamedTuple):
    """A config the model must compute as transformers does."""
    config: dict
    """config.json keys beyond SIZES."""
    exercises: str
    contrasts: dict = {}
    """What the case exercises, turned off: name → config edits (a model_type among them reads the
    same weights as that architecture, ignoring the tensors it has no use for). transformers'
    logits for each are recorded too, to show that the reference tells them apart."""


class Refused(NamedTuple):
    """A config the model must refuse with UnsupportedModelError, its message naming ``match``
    (see :func:`refusal_pattern`)."""
    config: dict
    exercises: str
    match: str


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
"""Llama 3.x's RoPE scaling with its original context cut to 64, so that the four frequencies of a
head of 8 fall in all three bands (kept, smoothed, divided)."""


def no_layer_slides(layers):
    """The config edit that makes every one of ``layers`` layers attend to all earlier positions."""
    return {"layer_types": ["full_attention"] * layers}


CASES = {
    "llama_tied": Case({"model_type": "llama", "tie_word_embeddings": True}, "LM head tied to the embedding"),
    "llama_untied": Case({"model_type": "llama", "tie_word_embeddings": False}, "LM head of its own"),
    "llama_biases": Case({"model_type": "llama", "attention_bias": True, "mlp_bias": True},
                         "attention_bias (q, k, v, o) and mlp_bias (gate, up, down)",
                         {"no biases": {"attention_bias": False, "mlp_bias": False}}),
    "llama_head_dim": Case({"model_type": "llama", "head_dim": 16}, "head_dim 16 ≠ hidden / heads = 8"),
    "llama3_rope_scaling": Case({"model_type": "llama", "rope_scaling": LLAMA3},
                                "rope_scaling llama3, original context 64: all three bands",
                                {"plain RoPE": {"rope_parameters": {"rope_type": "default",
                                                                    "rope_theta": 10000.0}}}),
    "mistral_window_wide": Case({"model_type": "mistral", "sliding_window": 2000},
                                "sliding_window 2000, wider than every input"),
    "mistral_window": Case({"model_type": "mistral", "sliding_window": 8},
                           "sliding_window 8 in every layer: crossed at 16 and at 1,100 positions",
                           {"no window": {"sliding_window": None}}),
    "qwen2": Case({"model_type": "qwen2"}, "q, k, v biases (o none)", {"as Llama": {"model_type": "llama"}}),
    "qwen2_sliding": Case({"model_type": "qwen2", "use_sliding_window": True,
                           "sliding_window": 8, "max_window_layers": 1},
                          "use_sliding_window, window 8 from layer max_window_layers = 1 on (layer 1 of 2)",
                          {"no window": no_layer_slides(2)}),
    "qwen3": Case({"model_type": "qwen3", "head_dim": 16},
                  "q_norm / k_norm over each head, head_dim 16 given apart",
                  {"as Llama": {"model_type": "llama"}}),
    "gemma": Case({"model_type": "gemma", "head_dim": 16, "hidden_act": "gelu"},
                  "(1 + w) norms, √hidden embedding scale, GeGLU (legacy hidden_act 'gelu' read as "
                  "tanh GELU)",
                  {"as Llama": {"model_type": "llama", "hidden_act": "silu"}}),
    "gemma2": Case({"model_type": "gemma2", "head_dim": 8, "query_pre_attn_scalar": 32, "sliding_window": 8,
                    "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
                   "post-norms, soft-caps 2 (scores) and 3 (logits), query_pre_attn_scalar 32 ≠ head_dim, "
                   "window 8 in layer 0 of 2",
                   {"no soft-caps": {"attn_logit_softcapping": None, "final_logit_softcapping": None},
                    "no window": no_layer_slides(2), "scale 1/√head_dim": {"query_pre_attn_scalar": 8}}),
    "gemma3_text": Case({"model_type": "gemma3_text", "num_hidden_layers": 3, "head_dim": 8,
                         "query_pre_attn_scalar": 32, "sliding_window": 8, "sliding_window_pattern": 3,
                         "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0},
                        "q/k norms, window 8 in layers 0 and 1 of 3 (sliding_window_pattern 3), "
                        "local RoPE base 1e4 there, rope_theta 1e6 in the global layer",
                        {"one RoPE base": {"rope_parameters": {
                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0}}},
                         "no window": no_layer_slides(3)}),
    "gemma3_text_caps": Case({"model_type": "gemma3_text", "num_hidden_layers": 2, "head_dim": 8,
                              "sliding_window_pattern": 2, "sliding_window": 8,
                              "attn_logit_softcapping": 1.0, "final_logit_softcapping": 3.0},
                             "final_logit_softcapping 3; attn_logit_softcapping 1, which transformers' "
                             "Gemma 3 attention never applies",
                             {"no final soft-cap": {"final_logit_softcapping": None}}),
    "phi3": Case({"model_type": "phi3", "rope_scaling": None, "sliding_window": 8},
                 "fused qkv_proj and gate_up_proj, sliding_window 8 in every layer",
                 {"no window": {"sliding_window": None}}),
    "smollm3_nope": Case({"model_type": "smollm3", "no_rope_layers": [1, 0]},
                         "no_rope_layers [1, 0]: layer 1 without RoPE (1 = RoPE, 0 = none)",
                         {"RoPE everywhere": {"no_rope_layers": [1, 1]}}),
    "smollm3_sliding": Case({"model_type": "smollm3", "no_rope_layers": [1, 0], "use_sliding_window": True,
                             "sliding_window": 8},
                            "use_sliding_window, window 8: the layer without RoPE (1) slides, layer 0 "
                            "does not",
                            {"no window": no_layer_slides(2), "RoPE everywhere": {"no_rope_layers": [1, 1]}}),
    "granite": Case({"model_type": "granite", "embedding_multiplier": 3.0, "attention_multiplier": 0.25,
                     "residual_multiplier": 0.5, "logits_scaling": 2.0},
                    "embedding ×3, scores ×0.25 (not 1/√8), residual ×0.5, logits ÷2",
                    {"embedding_multiplier 1": {"embedding_multiplier": 1.0},
                     "attention_multiplier 1/√8": {"attention_multiplier": 8 ** -0.5},
                     "residual_multiplier 1": {"residual_multiplier": 1.0},
                     "logits_scaling 1": {"logits_scaling": 1.0}}),
}

NOT_YET = ("phi3",)
"""Recorded cases the model refuses for now (Phi-3's fused qkv_proj / gate_up_proj): the matrix
checks that they are refused with UnsupportedModelError, never loaded and run wrongly."""

SUPPORTED = [case for case in CASES if case not in NOT_YET]

REFUSED_SIZES = {"num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 32}
"""A refused case's model is smaller still: refusing it reads no more than its config and tensor names."""

REFUSED = {
    "olmo": Refused({"model_type": "olmo", "clip_qkv": 0.5}, "LayerNorm without weights, clip_qkv",
                    "model_type 'olmo'"),
    "olmo2": Refused({"model_type": "olmo2"}, "q/k norms over whole projections, post-norms only",
                     "model_type 'olmo2'"),
    "mixtral": Refused({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 1},
                       "mixture of experts", "model_type 'mixtral'"),
    "qwen2_moe": Refused({"model_type": "qwen2_moe", "num_experts": 2, "num_experts_per_tok": 1,
                          "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32},
                         "mixture of experts with a shared expert", "model_type 'qwen2_moe'"),
    "phi3_longrope": Refused({"model_type": "phi3", "original_max_position_embeddings": 64,
                              "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                                               "long_factor": [1.0, 2.0, 4.0, 8.0]}},
                             "rope_scaling longrope (Phi-3 128k)", "'longrope'"),
    "phi3_partial_rotary": Refused({"model_type": "phi3", "partial_rotary_factor": 0.5},
                                   "RoPE over half of each head (Phi-4-mini)", "partial_rotary_factor"),
    "llama_yarn": Refused({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                   "original_max_position_embeddings": 64}},
                          "rope_scaling yarn", "'yarn'"),
    "llama_linear_rope": Refused({"model_type": "llama",
                                  "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                                 "rope_scaling linear", "'linear'"),
    "llama_gelu": Refused({"model_type": "llama", "hidden_act": "gelu"}, "exact GELU in a Llama MLP",
                          "'gelu'"),
    "gemma2_exact_gelu": Refused({"model_type": "gemma2", "head_dim": 8, "hidden_activation": "gelu"},
                                 "hidden_activation 'gelu': Gemma 2 runs exact (erf) GELU, unlike Gemma 1",
                                 "'gelu'"),
    "gemma3_bidirectional": Refused({"model_type": "gemma3_text", "head_dim": 8,
                                     "use_bidirectional_attention": True},
                                    "bidirectional attention (EmbeddingGemma)",
                                    "use_bidirectional_attention"),
}


def config_of(case):
    """The full config.json dict of a case (CASES or REFUSED name)."""
    if case in CASES:
        return {**SIZES, **CASES[case].config}
    return {**SIZES, **REFUSED_SIZES, **REFUSED[case].config}


def refusal_pattern(case):
    """The regular expression a REFUSED case's UnsupportedModelError must match: its own reason, or
    its whole architecture refused (until the model computes that model_type at all)."""
    whole = f"model_type {config_of(case)['model_type']!r}"
    return f"{re.escape(REFUSED[case].match)}|{re.escape(whole)}"


def model_folder(case):
    return MODELS / case


def adapter_folder(case):
    return MODELS / case / "adapter"


def write_hub_folder(case, folder):
    """``folder`` made the case's model with hub_config.json as its config.json; returns it."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_folder(case) / "model.safetensors", folder)
    shutil.copy(model_folder(case) / "hub_config.json", folder / "config.json")
    return folder


def recorded(case):
    """The case's reference.npz as a dict of arrays."""
    with np.load(model_folder(case) / "reference.npz") as data:
        return {key: data[key] for key in data.files}


def pack_gradients(gradients):
    """{PEFT key: gradient} as three arrays (reference.npz keeps them so: one zip entry each, where an
    entry per tensor would cost more than the tensors): the keys, the shapes, the values end to end."""
    keys = sorted(gradients)
    return (np.array(keys), np.array([gradients[key].shape for key in keys]),
            np.concatenate([gradients[key].ravel() for key in keys]).astype(np.float32))


def recorded_gradients(reference, which):
    """{PEFT key: gradient} recorded at ``which`` ("grad16" or "grad_long") positions."""
    keys, shapes = reference["gradient_keys"], reference["gradient_shapes"]
    ends = np.cumsum([np.prod(shape) for shape in shapes])
    return {str(key): values.reshape(shape) for key, shape, values
            in zip(keys, shapes, np.split(reference[which], ends[:-1]))}


# ---------------------------------------------------------------------------
# Ours (NumPy)
# ---------------------------------------------------------------------------

def load_ours(case, adapter=False, train=False):
    """Our float32 model of the case's folder, with its PEFT adapter attached if asked."""
    from qlora_np.io.peft import load_peft
    from qlora_np.models.llama.model import LlamaModel

    model = LlamaModel.from_hf(model_folder(case), quant_type=None)
    if train:
        model.train()
    if adapter:
        load_peft(model, adapter_folder(case))
    return model


def our_long_rows(model):
    """Our logits at LONG_ROWS of LONG_IDS: PREFILL positions in one forward into a KV cache, then
    one token at a time, as decoding runs."""
    from qlora_np.models.llama.model import KVCache

    cache = KVCache(model.config, len(LONG_IDS))
    rows = [model.forward(np.array(LONG_IDS[:PREFILL]), cache=cache)]
    rows += [model.forward(np.array([token]), cache=cache) for token in LONG_IDS[PREFILL:]]
    return np.concatenate(rows)[list(LONG_ROWS)]


def our_gradients(case, ids):
    """{PEFT key: gradient} of the mean cross-entropy of ``ids`` (each predicting the next) with
    respect to every adapter weight of our model, in PEFT's row order."""
    from qlora_np.io.peft import peft_names
    from qlora_np.models.llama.lora import loss_and_backward, trainable_parameters
    from qlora_np.models.llama.names import unpermute_rope_rows

    model = load_ours(case, adapter=True, train=True)
    ids = np.array(ids)
    labels = np.append(ids[1:], -100)                       # ours come shifted; transformers shifts inside
    loss_and_backward(model, ids[None], labels[None])
    params = trainable_parameters(model)
    gradients = {}
    for name, (key, heads) in peft_names(model).items():
        grad = params[name].grad
        gradients[key] = grad if heads is None else unpermute_rope_rows(grad, heads)
    return gradients


def max_error(ours, theirs):
    """max |ours − theirs| (inf if the shapes differ)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    return float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else float("inf")


def gradient_errors(ours, theirs):
    """PEFT key → max|ours − theirs| / max|theirs|, for the keys of both; inf for a key only one has."""
    return {key: max_error(ours[key], theirs[key]) / float(np.abs(theirs[key]).max())
            if key in ours and key in theirs else float("inf") for key in set(ours) | set(theirs)}


# ---------------------------------------------------------------------------
# Theirs (torch, transformers, PEFT)
# ---------------------------------------------------------------------------

def build_transformers_model(case, seed):
    """transformers' model of the case's config (float32, eager attention), seeded, with every norm
    weight drawn from U(0.5, 1.5) and every bias from N(0, 0.2²): their initial ones and zeros would
    hide the difference between w and 1 + w, or a bias left out."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**config_of(case))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    return model.eval()


def load_transformers(folder, **edits):
    """transformers' float32 eager model of a saved folder, its config changed by ``edits`` (a
    ``model_type`` among them reads the folder as that architecture). Tensors the edited model has
    no use for are left out, as a loader that ignores them would; a weight it lacks is an error."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    edits = dict(edits)
    model_type = edits.pop("model_type", None)
    config = AutoConfig.from_pretrained(folder)
    if model_type is not None:
        config = AutoConfig.for_model(model_type, **{key: value for key, value in config.to_dict().items()
                                                     if key != "model_type"})
    for key, value in edits.items():
        setattr(config, key, value)
    config = type(config).from_dict(config.to_dict())       # re-derive what the edited keys imply
    model, info = AutoModelForCausalLM.from_pretrained(folder, config=config, attn_implementation="eager",
                                                       dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(f"{folder} as edited by {edits}: no weights for {sorted(info['missing_keys'])}")
    return model.eval()


def transformers_logits(model, ids, rows=None):
    """(T, vocab) float32 logits of ``ids``, or only those at ``rows``."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    return logits if rows is None else logits[list(rows)]


def random_peft_model(model, seed):
    """``model`` wrapped by PEFT LoRA (LORA) with A and B drawn from N(0, 0.2²): PEFT's B = 0 would
    leave the logits unchanged and A's gradient zero."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return peft_model


def load_transformers_peft(case):
    """The case's saved model with its saved adapter, trainable, as PEFT loads them."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_transformers(model_folder(case)), adapter_folder(case),
                                     is_trainable=True).eval()


def transformers_gradients(peft_model, ids):
    """{PEFT key (as adapter_model.safetensors names it): gradient} of transformers' causal-LM loss
    on ``ids`` with labels = ids (the mean cross-entropy, shifted inside)."""
    import torch

    peft_model.zero_grad()
    with torch.enable_grad():
        ids = torch.tensor([ids])
        peft_model(input_ids=ids, labels=ids).loss.backward()
    return {name.replace(".default", ""): param.grad.numpy().copy()
            for name, param in peft_model.named_parameters() if "lora_" in name}


def transformers_reference(case):
    """What reference.npz holds, computed now from the case's saved folder: transformers' logits
    (``logits`` at IDS, ``long`` at LONG_ROWS of LONG_IDS), each contrast's (``contrast/<name>/…``),
    PEFT's logits (``peft_logits``) and gradients at IDS (``grad16``) and LONG_IDS (``grad_long``)
(see :func:`pack_gradients`)."""
    import peft
    import torch
    import transformers

    model = load_transformers(model_folder(case))
    out = {"logits": transformers_logits(model, IDS), "long": transformers_logits(model, LONG_IDS, LONG_ROWS),
           "torch_version": torch.__version__, "transformers_version": transformers.__version__,
           "peft_version": peft.__version__}
    for name, edits in CASES[case].contrasts.items():
        contrast = load_transformers(model_folder(case), **edits)
        out[f"contrast/{name}/logits"] = transformers_logits(contrast, IDS)
        out[f"contrast/{name}/long"] = transformers_logits(contrast, LONG_IDS, LONG_ROWS)
    peft_model = load_transformers_peft(case)
    out["peft_logits"] = transformers_logits(peft_model, IDS)
    for which, ids in (("grad16", IDS), ("grad_long", LONG_IDS)):
        out["gradient_keys"], out["gradient_shapes"], out[which] = pack_gradients(
            transformers_gradients(peft_model, ids))
    return out
