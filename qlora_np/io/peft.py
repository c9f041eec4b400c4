"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, both directions.

PEFT names each adapter after the Hugging Face module it wraps:
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` (r, in) and
``….lora_B.weight`` (out, r). Hugging Face keeps q and k rows in rotate-half order, this
model in GGUF's adjacent-pair order, so B of q_proj / k_proj is permuted on the way in
and back on the way out (A indexes input features and is never permuted).

PEFT's scale is lora_alpha / r (lora_alpha / √r with ``use_rslora``). A layer whose rank
or alpha differs from the file-wide ``r`` / ``lora_alpha`` is listed in ``rank_pattern``
/ ``alpha_pattern``, keyed by its module name (``model.layers.0.self_attn.v_proj``) or a
name suffix (``v_proj``). Pattern keys are matched as plain names, never run as regular
expressions; only ``adapter_model.safetensors`` is read (no pickle).
"""

import json
import math
import os
import re

import numpy as np

from qlora_np.models.llama.adapters import attach_adapter, model_adapters
from qlora_np.errors import CheckpointError, InvalidValueError, ShapeError
from qlora_np.models.llama.names import HF_LINEAR_NAMES, permute_rope_rows, rope_heads, unpermute_rope_rows
from qlora_np.models.llama.lora import trainable_parameters
from qlora_np.io.safetensors import atomic_write, read_safetensors, save_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)"
                 r"\.lora_([AB])(?:\.default)?\.weight")
GGUF_NAMES = {hf: gguf for gguf, hf in HF_LINEAR_NAMES.items()}        # "self_attn.q_proj" → "attn_q"


def save_peft(model, folder, base_model_name_or_path=None, lora_dropout=0.0):
    """Write the model's adapters as a PEFT LoRA adapter folder that ``PeftModel.from_pretrained`` loads.

    ``base_model_name_or_path`` defaults to the Hugging Face folder the model came from.
    """
    tensors, config = peft_adapter(model, base_model_name_or_path, lora_dropout)
    write_peft(folder, tensors, config)
    return config


def peft_adapter(model, base_model_name_or_path=None, lora_dropout=0.0):
    """The model's adapters as PEFT holds them: ({key: float32 array}, adapter_config dict)."""
    adapted = list(model_adapters(model))
    if not adapted:
        raise InvalidValueError("the model has no adapters to save (inject_lora first)")
    first = adapted[0][2]
    r, use_rslora = first.r, bool(first.use_rslora)
    alpha = _peft_alpha(first, use_rslora)
    rank_pattern, alpha_pattern = {}, {}
    for index, name, layer in adapted:
        module = f"model.layers.{index}.{HF_LINEAR_NAMES[name]}"
        if layer.r != r:
            rank_pattern[module] = int(layer.r)
        if not np.isclose(_peft_alpha(layer, use_rslora), alpha, rtol=1e-6, atol=0):
            alpha_pattern[module] = _peft_alpha(layer, use_rslora)
    layers = sorted({index for index, _, _ in adapted})
    targets = sorted({HF_LINEAR_NAMES[name].split(".")[1] for _, name, _ in adapted})
    if len(adapted) != len(layers) * len(targets):
        raise InvalidValueError("PEFT's config needs the same modules adapted in every adapted layer")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
              "r": int(r), "lora_alpha": alpha,
              "use_rslora": use_rslora, "target_modules": targets,
              "lora_dropout": float(lora_dropout), "bias": "none", "fan_in_fan_out": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "layers_to_transform": None if len(layers) == len(model.blocks) else layers,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    return to_peft(model), config


def write_peft(folder, tensors, config):
    """Write adapter_model.safetensors and adapter_config.json into ``folder`` (each atomically)."""
    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, WEIGHTS_FILE), tensors, metadata={"format": "pt"})
    with atomic_write(os.path.join(folder, CONFIG_FILE), "w") as stream:
        json.dump(config, stream, indent=2)


def peft_names(model):
    """Parameter name as :func:`qlora_np.models.llama.lora.trainable_parameters` gives it
    (``blk.N.attn_q.lora_a``) → (PEFT key, heads) for every adapter of ``model``; heads is
    the head count of q or k for their B, whose rows PEFT keeps in rotate-half order, else None."""
    names = {}
    for index, name, _ in model_adapters(model):
        module = f"{KEY_PREFIX}model.layers.{index}.{HF_LINEAR_NAMES[name]}"
        names[f"blk.{index}.{name}.lora_a"] = (f"{module}.lora_A.weight", None)
        names[f"blk.{index}.{name}.lora_b"] = (f"{module}.lora_B.weight", rope_heads(model.config, name))
    return names


def to_peft(model):
    """The model's adapters as PEFT stores them: {PEFT key: float32 array}, B of q and k in HF row order."""
    values = {name: param.value for name, param in trainable_parameters(model).items()}
    return {key: np.asarray(values[name] if heads is None else unpermute_rope_rows(values[name], heads),
                            np.float32)
            for name, (key, heads) in peft_names(model).items()}


def from_peft(model, tensors):
    """The inverse of :func:`to_peft` for the keys present: {parameter name (as
    :func:`qlora_np.models.llama.lora.trainable_parameters` names it): array in this model's order}. An
    array of a shape no q or k B has is passed on as it is, for the caller's shape check to name."""
    arrays = {}
    for name, (key, heads) in peft_names(model).items():
        if key in tensors:
            value = tensors[key]
            fits = heads is not None and value.ndim == 2 and value.shape[0] % (2 * heads) == 0
            arrays[name] = permute_rope_rows(value, heads) if fits else value
    return arrays


def load_peft(model, folder):
    """Attach the adapters of a PEFT LoRA folder to ``model`` (a Llama from GGUF or HF); returns its config.

    A folder that is missing, malformed, or describes adapters that do not fit the
    model raises CheckpointError.
    """
    config = read_peft_config(folder)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        pickled = os.path.isfile(os.path.join(folder, "adapter_model.bin"))
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}" + (" (adapter_model.bin is a pickle, which "
                                                                "qlora_np never loads)" if pickled else ""))
    pairs = {}
    for key, array in read_safetensors(weights_path).items():
        match = KEY.fullmatch(key)
        if match is None or match.group(2) not in GGUF_NAMES:
            raise CheckpointError(f"{weights_path}: {key!r} is not a LoRA weight of a Llama block's "
                                  "linear layer")
        index, module, half = int(match.group(1)), match.group(2), match.group(3)
        pairs.setdefault((index, module), {})[half] = array
    for (index, module), halves in sorted(pairs.items()):
        if set(halves) != {"A", "B"}:
            raise CheckpointError(f"{weights_path}: layer {index} {module} has only lora_{''.join(halves)}")
        lora_a, lora_b = (_float_matrix(halves[h], f"{index}.{module}.lora_{h}", weights_path) for h in "AB")
        name = f"model.layers.{index}.{module}"
        r = _pattern_value(config["rank_pattern"], name, config["r"])
        if lora_a.shape[0] != r:
            raise CheckpointError(f"{weights_path}: {name} has rank {lora_a.shape[0]}, the config says {r}")
        try:
            attach_adapter(model, index, GGUF_NAMES[module], lora_a, lora_b,
                           _pattern_value(config["alpha_pattern"], name, config["lora_alpha"]),
                           config["use_rslora"], hf_rows=True)
        except (ShapeError, InvalidValueError) as error:
            raise CheckpointError(f"{weights_path}: {error}") from None
    return config


def read_peft_config(folder):
    """adapter_config.json as a dict, checked for what a plain LoRA adapter needs."""
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as stream:
            config = json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    config = dict(config)
    config.setdefault("rank_pattern", {})
    config.setdefault("alpha_pattern", {})
    checks = [("peft_type", lambda v: v == "LORA", "'LORA'"),
              ("r", _positive_int, "a positive int"),
              ("lora_alpha", _finite_number, "a number"),
              ("use_rslora", lambda v: isinstance(v, bool), "true or false"),
              ("rank_pattern", lambda v: _pattern(v, _positive_int), "{module: positive int}"),
              ("alpha_pattern", lambda v: _pattern(v, _finite_number), "{module: number}")]
    for key, valid, expected in checks:
        if not valid(config.get(key)):
            raise CheckpointError(f"{path}: {key} must be {expected}, got {config.get(key)!r}")
    for key, unsupported in (("use_dora", True), ("fan_in_fan_out", True)):
        if config.get(key) is unsupported:
            raise CheckpointError(f"{path}: {key}=true adapters are not supported")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={config['bias']!r} adapters are not supported (only 'none')")
    return config


def _peft_alpha(layer, use_rslora):
    """The lora_alpha that gives this layer its scale under PEFT's rule (alpha/r or alpha/√r)."""
    return float(layer.scale * (np.sqrt(layer.r) if use_rslora else layer.r))


def _pattern_value(pattern, module, default):
    """PEFT's rank/alpha pattern lookup, with keys read as plain names: the whole name or a dotted suffix."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _float_matrix(array, name, path):
    if array.dtype.kind != "f" and str(array.dtype) != "bfloat16" or array.ndim != 2:
        raise CheckpointError(f"{path}: {name} must be a 2-D float tensor, got {array.dtype} {array.shape}")
    values = np.asarray(array, np.float32)
    if not np.all(np.isfinite(values)):
        raise CheckpointError(f"{path}: {name} holds NaN or inf")
    return values


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:                      # an int too large for a float
        return False


def _pattern(value, valid):
    """A {plain module name: value} dict; regular-expression keys are refused rather than run."""
    return isinstance(value, dict) and all(isinstance(k, str) and re.fullmatch(r"[\w.]+", k) and valid(v)
                                           for k, v in value.items())
