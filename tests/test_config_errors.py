"""Bad input gets a clear ValueError / TypeError that says what to pass instead."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pio_fvlm
from pio_fvlm import PruneConfig


@pytest.mark.parametrize(
    "budget, error, words",
    [
        (0, ValueError, "keep no visual token"),
        (-3, ValueError, "keep no visual token"),
        (math.nan, ValueError, "not a valid fraction"),
        (1.5, ValueError, "not a valid fraction"),
        (0.0, ValueError, "not a valid fraction"),
        ("64", TypeError, "must be a number"),
        (True, TypeError, "must be a number"),
        (None, TypeError, "must be a number"),
    ],
)
def test_bad_budget(llava_sdpa, budget, error, words):
    with pytest.raises(error, match=words) as info:
        pio_fvlm.wrap(llava_sdpa, budget=budget)
    assert "budget=64" in str(info.value)  # the message shows what to pass
    assert not pio_fvlm.is_wrapped(llava_sdpa)


@pytest.mark.parametrize("layer", [0, 4, 10, -1])
def test_layer_out_of_range(llava_sdpa, layer):
    with pytest.raises(ValueError, match=r"1 <= layer <= 3"):
        pio_fvlm.wrap(llava_sdpa, budget=4, layer=layer)


def test_layer_wrong_type(llava_sdpa):
    with pytest.raises(TypeError, match="layer must be an int"):
        pio_fvlm.wrap(llava_sdpa, budget=4, layer=1.0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"nms_threshold": 1.5}, "cosine similarity"),
        ({"proxy_tokens": 0}, "proxy_tokens"),
        ({"positions": "shift"}, "positions must be one of"),
    ],
)
def test_other_bad_settings(llava_sdpa, kwargs, words):
    with pytest.raises(ValueError, match=words):
        pio_fvlm.wrap(llava_sdpa, budget=4, **kwargs)


def test_plain_language_model_is_refused():
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type='llama'.*Supported: LLaVA-1.5"):
        pio_fvlm.wrap(lm, budget=4)


@pytest.mark.parametrize("thing", [torch.nn.Linear(3, 3), "llava", 42])
def test_non_vlm_objects_are_refused(thing):
    with pytest.raises((TypeError, ValueError), match="Supported: LLaVA-1.5"):
        pio_fvlm.wrap(thing, budget=4)


def test_part_of_a_model_is_refused(llava_sdpa):
    with pytest.raises(ValueError, match="wrap the whole"):
        # LlavaModel has model_type llava too, but no lm_head
        pio_fvlm.wrap(llava_sdpa.model, budget=4)


def test_config_and_keywords_conflict(llava_sdpa):
    with pytest.raises(ValueError, match="not both"):
        pio_fvlm.wrap(llava_sdpa, budget=8, config=PruneConfig(budget=4))
    with pytest.raises(TypeError, match="PruneConfig"):
        pio_fvlm.wrap(llava_sdpa, config={"budget": 4})


def test_rewrap_replaces_settings(llava_sdpa):
    try:
        pio_fvlm.wrap(llava_sdpa, budget=4)
        pio_fvlm.wrap(llava_sdpa, config=PruneConfig(budget=6, layer=2))
        assert pio_fvlm.get_config(llava_sdpa) == PruneConfig(budget=6, layer=2)
        # exactly one set of hooks: one pre-hook on the base module
        assert len(llava_sdpa.model._forward_pre_hooks) == 1
    finally:
        pio_fvlm.unwrap(llava_sdpa)
    assert not llava_sdpa.model._forward_pre_hooks


def test_unwrap_unwrapped_model(llava_sdpa):
    with pytest.raises(ValueError, match="not wrapped"):
        pio_fvlm.unwrap(llava_sdpa)
    with pytest.raises(ValueError, match="not wrapped"):
        pio_fvlm.last_selection(llava_sdpa)


def test_unsupported_attention_backend():
    from tiny_models import tiny_llava

    model = tiny_llava()
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        pio_fvlm.wrap(model, budget=4)


def test_budget_fraction_rounding():
    from pio_fvlm.config import tokens_to_keep

    assert tokens_to_keep(0.111, 2880) == 320  # the paper's 11.1 % of LLaVA-NeXT
    assert tokens_to_keep(64 / 576, 576) == 64
    assert tokens_to_keep(0.001, 16) == 1
    assert tokens_to_keep(100, 16) == 16


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_compact_positions_refused_for_mrope(family):
    from tiny_models import tiny_vlm

    model = tiny_vlm(family)
    with pytest.raises(ValueError, match="positions='compact' is not available for Qwen2"):
        pio_fvlm.wrap(model, budget=4, positions="compact")


def test_supported_model_types():
    assert pio_fvlm.supported_model_types() == [
        "internvl", "llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"]


def test_budget_above_visual_count_warns_once(llava_sdpa, caplog):
    import logging

    from tiny_models import Prompt, make_batch

    inputs = make_batch(llava_sdpa, [Prompt(before=[5], after=[9, 10])])
    pio_fvlm.wrap(llava_sdpa, budget=500)
    try:
        with caplog.at_level(logging.WARNING, logger="pio_fvlm"):
            for _ in range(3):
                with torch.no_grad():
                    llava_sdpa(**inputs)
    finally:
        pio_fvlm.unwrap(llava_sdpa)
    assert sum("nothing is pruned" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("model_type, why", [("qwen3_5", "recurrent state"), ("gemma3", "both directions"),
                                             ("paligemma", "both directions"), ("mllama", "cross-attention")])
def test_known_unsupported_families_are_refused_with_the_reason(model_type, why):
    import types

    from torch import nn

    class Stand(nn.Module):
        config = types.SimpleNamespace(model_type=model_type)

    with pytest.raises(ValueError, match=why) as refused:
        pio_fvlm.wrap(Stand(), budget=64)
    assert "Supported: LLaVA-1.5" in str(refused.value)


def test_defaults_are_the_authors_settings():
    cfg = PruneConfig()
    assert (cfg.budget, cfg.layer, cfg.nms_threshold, cfg.proxy_tokens, cfg.proxy_includes_last) == (64, 1, 0.8, 4,
                                                                                                      False)
    assert (cfg.positions, cfg.schedule, cfg.encoder, cfg.capture) == ("keep", None, None, False)


@pytest.mark.parametrize("settings", [
    {"budget": 1}, {"budget": 1.0}, {"layer": 1}, {"layer": 31}, {"nms_threshold": 1.0}, {"nms_threshold": -0.99},
    {"proxy_tokens": 1},
])
def test_every_range_includes_its_ends(settings):
    """The closed ends of each accepted range are accepted (32 decoder layers: layer 1 to 31); the
    open lower end of nms_threshold's (-1, 1] is approached, and -1 itself is refused below."""
    assert PruneConfig(**settings).validate(num_layers=32) is not None


@pytest.mark.parametrize("settings, error, words", [
    ({"layer": 32}, ValueError, "pass 1 <= layer <= 31"),
    ({"layer": 1.0}, TypeError, r"\(1 <= layer <= 31\)"),
    ({"nms_threshold": True}, TypeError, "nms_threshold must be a float"),
    ({"nms_threshold": "0.8"}, TypeError, "nms_threshold must be a float"),
    ({"nms_threshold": 1.0001}, ValueError, "not a cosine similarity"),
    ({"nms_threshold": -1.0}, ValueError, "not a cosine similarity"),
    ({"proxy_tokens": 0}, ValueError, "proxy_tokens must be an int >= 1"),
])
def test_just_outside_every_range_is_refused(settings, error, words):
    with pytest.raises(error, match=words):
        PruneConfig(**settings).validate(num_layers=32)
