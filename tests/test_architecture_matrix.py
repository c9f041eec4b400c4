"""Every architecture of tests/architecture_cases.py against its transformers + PEFT twin: the
logits (16 positions in one forward; 1,100 through the KV cache), the logits with a PEFT adapter,
and the adapters' gradients (16 and 1,100 positions) from the recorded files, without torch; the
same at 16 positions live where torch is installed; the configs that must be refused; and that the
recorded references tell apart what each case exercises, so that the comparisons can fail."""

import json

import numpy as np
import pytest

from qlora_np.errors import UnsupportedModelError
from qlora_np.models.llama.model import LlamaModel

from .architecture_cases import (CASES, CONTRAST_MIN, NOT_YET, SUPPORTED, GRADIENT_RTOL, IDS, LOGIT_ATOL, LONG_IDS, REFUSED,
                                 adapter_folder, gradient_errors, load_ours, model_folder, our_gradients,
                                 our_long_rows, recorded, recorded_gradients, refusal_pattern,
                                 write_hub_folder)

CONTRASTS = [(case, name) for case, spec in CASES.items() for name in spec.contrasts]


def assert_gradients_close(ours, theirs):
    """Each tensor within GRADIENT_RTOL · max|theirs|, and the same PEFT keys on both sides."""
    errors = gradient_errors(ours, theirs)
    bad = {key: error for key, error in errors.items() if not error <= GRADIENT_RTOL}
    worst = dict(sorted(bad.items(), key=lambda item: -item[1])[:5])
    assert not bad, f"{len(bad)} of {len(errors)} gradients off (relative error; inf: a key on one side " \
                    f"only): {worst}"


# -- recorded twins ------------------------------------------------------------

@pytest.mark.parametrize("case", SUPPORTED)
def test_logits_match_transformers(case):
    logits = load_ours(case).forward(np.array(IDS))
    np.testing.assert_allclose(logits, recorded(case)["logits"], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("case", SUPPORTED)
def test_long_logits_through_the_kv_cache_match_transformers(case):
    np.testing.assert_allclose(our_long_rows(load_ours(case)), recorded(case)["long"], atol=LOGIT_ATOL,
                               rtol=0)


@pytest.mark.parametrize("case", SUPPORTED)
def test_the_hub_config_gives_the_same_logits(case, tmp_path):
    """The case's config as a Hub checkpoint writes it (rope_scaling, rope_local_base_freq,
    sliding_window_pattern, Gemma's legacy hidden_act …), not as save_pretrained rewrote it."""
    logits = LlamaModel.from_hf(write_hub_folder(case, tmp_path), quant_type=None).forward(np.array(IDS))
    np.testing.assert_allclose(logits, recorded(case)["logits"], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("case", SUPPORTED)
def test_peft_adapter_logits_match_peft(case):
    logits = load_ours(case, adapter=True).forward(np.array(IDS))
    np.testing.assert_allclose(logits, recorded(case)["peft_logits"], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("case", SUPPORTED)
def test_adapter_gradients_match_autograd(case):
    assert_gradients_close(our_gradients(case, IDS), recorded_gradients(recorded(case), "grad16"))


@pytest.mark.slow
@pytest.mark.parametrize("case", SUPPORTED)
def test_long_adapter_gradients_match_autograd(case):
    assert_gradients_close(our_gradients(case, LONG_IDS), recorded_gradients(recorded(case), "grad_long"))


# -- live twins ------------------------------------------------------------------

@pytest.mark.parametrize("case", SUPPORTED)
def test_logits_match_transformers_live(case):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from .architecture_cases import load_transformers, transformers_logits

    expected = transformers_logits(load_transformers(model_folder(case)), IDS)
    np.testing.assert_allclose(load_ours(case).forward(np.array(IDS)), expected, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("case", SUPPORTED)
def test_adapter_gradients_match_autograd_live(case):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from .architecture_cases import load_transformers_peft, transformers_gradients

    expected = transformers_gradients(load_transformers_peft(case), IDS)
    assert_gradients_close(our_gradients(case, IDS), expected)


# -- refusals ----------------------------------------------------------------------

@pytest.mark.parametrize("case", REFUSED)
def test_architectures_this_model_would_get_wrong_are_refused(case):
    with pytest.raises(UnsupportedModelError, match=refusal_pattern(case)):
        LlamaModel.from_hf(model_folder(case), quant_type=None)


# -- the recordings themselves -----------------------------------------------------

@pytest.mark.parametrize("case, contrast", CONTRASTS, ids=[f"{case}-{name}" for case, name in CONTRASTS])
def test_the_reference_tells_apart_what_the_case_exercises(case, contrast):
    """transformers' logits with the feature turned off (same weights) lie far outside the
    tolerance from the reference, at 16 or at 1,100 positions: leaving it out cannot pass."""
    reference = recorded(case)
    apart = max(np.abs(reference[f"contrast/{contrast}/{part}"] - reference[part]).max()
                for part in ("logits", "long"))
    assert apart > CONTRAST_MIN


@pytest.mark.parametrize("case", CASES)
def test_the_recorded_adapter_covers_every_linear_layer_with_nonzero_gradients(case):
    """Every linear weight of the blocks (fused ones included) has a lora_A and a lora_B in the
    adapter, each with a recorded gradient that is not zero at either length."""
    from safetensors import safe_open

    with safe_open(model_folder(case) / "model.safetensors", "np") as weights:
        linears = {name.removesuffix(".weight") for name in weights.keys()
                   if name.startswith("model.layers.") and name.endswith("proj.weight")}
    with safe_open(adapter_folder(case) / "adapter_model.safetensors", "np") as adapter:
        keys = set(adapter.keys())
    expected = {f"base_model.model.{linear}.lora_{half}.weight" for linear in linears for half in "AB"}
    assert keys == expected
    assert json.loads((adapter_folder(case) / "adapter_config.json").read_text())["lora_dropout"] == 0
    for which in ("grad16", "grad_long"):
        gradients = recorded_gradients(recorded(case), which)
        assert set(gradients) == expected and all(np.abs(grad).max() > 0 for grad in gradients.values())


@pytest.mark.parametrize("case", NOT_YET)
def test_recorded_cases_not_supported_yet_are_refused(case):
    with pytest.raises(UnsupportedModelError, match=f"model_type {CASES[case].config['model_type']!r}"):
        load_ours(case)


def test_the_readme_table_is_the_matrix():
    """README's supported-models table (printed by benchmarks/architectures.py --markdown) lists
    every case with the status the tests above hold it to."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- architectures -->")[1].split("<!-- /architectures -->")[0]
    statuses = {cells[2]: cells[4] for line in block.strip().splitlines()[2:]
                if len(cells := [cell.strip() for cell in line.strip("|").split("|")]) == 7}
    expected = {case: "right" for case in SUPPORTED} | {case: "refused" for case in (*NOT_YET, *REFUSED)}
    assert statuses == expected
    assert re.search(r"\| right \| \d", block)                  # with the errors measured
