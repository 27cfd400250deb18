"""The method's settings on the selector: PioSelector(nms_threshold, proxy_tokens, proxy_includes_last,
probe) checked in its constructor with wrap's messages, equal to the same keywords on wrap, and
refused twice over."""

from __future__ import annotations

import pytest
import torch

import pio_fvlm
from helpers import standard_batch
from pio_fvlm import PioSelector
from pio_fvlm.select.baselines import FastVSelector
from tiny_models import tiny_vlm

SETTINGS = {"nms_threshold": 0.5, "proxy_tokens": 2, "proxy_includes_last": True}


def kept_and_logits(model, inputs, **wrap_kwargs):
    pio_fvlm.wrap(model, budget=4, **wrap_kwargs)
    with torch.no_grad():
        logits = model(**inputs).logits
    kept = [k.tolist() for k in pio_fvlm.last_selection(model)]
    pio_fvlm.unwrap(model)
    return kept, logits


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl_moe"])
def test_settings_on_the_selector_equal_the_same_keywords_on_wrap(family):
    model = tiny_vlm(family, seed=21)
    inputs = standard_batch(model)
    by_keywords = kept_and_logits(model, inputs, **SETTINGS)
    by_selector = kept_and_logits(model, inputs, selector=PioSelector(**SETTINGS))
    assert by_keywords[0] == by_selector[0]
    assert torch.equal(by_keywords[1], by_selector[1])


def test_the_settings_change_the_choice_here():
    """So that the equality above says something."""
    model = tiny_vlm("llava", seed=21)
    inputs = standard_batch(model)
    assert kept_and_logits(model, inputs)[0] != kept_and_logits(model, inputs, selector=PioSelector(**SETTINGS))[0]


def test_the_config_reports_the_selectors_settings():
    model = tiny_vlm("llava", seed=2)
    pio_fvlm.wrap(model, budget=4, selector=PioSelector(**SETTINGS, probe="captured"))
    config = pio_fvlm.get_config(model)
    assert (config.nms_threshold, config.proxy_tokens, config.proxy_includes_last, config.capture) == (
        0.5, 2, True, True)
    assert pio_fvlm.describe(model).selectors[0].proxy.tokens == 2


@pytest.mark.parametrize("kwargs, error, words", [
    ({"nms_threshold": 1.5}, ValueError, "is not a cosine similarity"),
    ({"nms_threshold": "high"}, TypeError, "nms_threshold must be a float"),
    ({"proxy_tokens": 0}, ValueError, "proxy_tokens must be an int >= 1"),
    ({"proxy_includes_last": 1}, TypeError, "proxy_includes_last must be True or False"),
    ({"probe": "fastest"}, ValueError, "probe must be one of")])
def test_bad_selector_settings_are_refused_in_its_constructor(kwargs, error, words):
    with pytest.raises(error, match=words):
        PioSelector(**kwargs)
    name = next(iter(kwargs))
    if name != "probe":  # wrap's keyword gives the same message
        with pytest.raises(error, match=words):
            pio_fvlm.wrap(tiny_vlm("llava", num_layers=2), **kwargs)


def test_a_setting_on_both_the_selector_and_wrap_is_refused():
    model = tiny_vlm("llava", num_layers=2)
    with pytest.raises(ValueError, match="has its own nms_threshold: set it there"):
        pio_fvlm.wrap(model, budget=4, selector=PioSelector(), nms_threshold=0.7)
    with pytest.raises(ValueError, match="capture, proxy_tokens"):
        pio_fvlm.wrap(model, budget=4, selector=PioSelector(), proxy_tokens=2, capture=True)
    assert not pio_fvlm.is_wrapped(model)


@pytest.mark.parametrize("probe", ["closed_form", "fast", "full"])
def test_every_probe_named_on_the_selector_chooses_the_same_tokens(probe):
    model = tiny_vlm("qwen2_5_vl", seed=5)
    inputs = standard_batch(model)
    auto = kept_and_logits(model, inputs)
    pio_fvlm.wrap(model, budget=4, selector=PioSelector(probe=probe))
    assert pio_fvlm.describe(model).probes == (probe,)
    pio_fvlm.unwrap(model)
    named = kept_and_logits(model, inputs, selector=PioSelector(probe=probe))
    assert named[0] == auto[0]
    torch.testing.assert_close(named[1], auto[1], rtol=1e-4, atol=1e-5)


def test_a_probe_the_layers_do_not_allow_is_refused_at_wrap():
    model = tiny_vlm("qwen3_vl_moe", num_layers=2)  # routed experts: no closed form
    with pytest.raises(ValueError, match="probe='closed_form' is not available"):
        pio_fvlm.wrap(model, budget=4, selector=PioSelector(probe="closed_form"))


def test_fastv_reads_the_last_prompt_token_whatever_the_wraps_proxy_window():
    model = tiny_vlm("llava", seed=8)
    inputs = standard_batch(model)
    kept = [kept_and_logits(model, inputs, layer=2, selector=FastVSelector(), proxy_includes_last=last)[0]
            for last in (False, True)]
    assert kept[0] == kept[1]


class RecordingPio(PioSelector):
    """PIO-FVLM, recording the proxy positions the runtime hands over."""

    def __call__(self, request):
        self.seen = request.probe_inputs.query_positions.clone()
        return super().__call__(request)


@pytest.mark.parametrize("includes_last", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_the_runtime_hands_over_the_selectors_proxy_window(padded, includes_last):
    """Built on the host when no row is padded, on the device otherwise: the same positions as
    select.saliency.proxy_query_positions."""
    from pio_fvlm.select import proxy_query_positions
    from tiny_models import Prompt, make_batch

    model = tiny_vlm("llava", seed=3)
    prompts = [Prompt(before=[5, 6], after=[9, 10, 11, 12, 13])]
    if padded:
        prompts.append(Prompt(before=[5, 6, 7, 8], after=[9, 10, 11, 12, 13, 14]))
    inputs = make_batch(model, prompts)
    selector = RecordingPio(proxy_tokens=3, proxy_includes_last=includes_last)
    pio_fvlm.wrap(model, budget=2, selector=selector)
    with torch.no_grad():
        model(**inputs)
    want = proxy_query_positions(inputs["attention_mask"].bool(), 3, includes_last)
    assert torch.equal(selector.seen, want)
