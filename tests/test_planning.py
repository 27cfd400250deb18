"""wrap's plan: settings resolved in one place, a pure planning step, the runtime built from it.

The schedule / single-stage rule is one rule for ``PruneConfig`` and ``wrap`` alike; a selector that
reads no hidden states may prune before layer 0 through ``wrap`` itself (the benchmark's ideal bound).
"""

from __future__ import annotations

import pytest
import torch

import pio_fvlm
from helpers import n_visual, standard_batch
from pio_fvlm import PruneConfig
from pio_fvlm.api import runtime_for
from pio_fvlm.measure import layer_lengths
from pio_fvlm.planning import Stage, plan_pruning, settings_from
from pio_fvlm.select import PioSelector
from pio_fvlm.select.baselines import FastVSelector, RandomSelector, UniformSelector
from tiny_models import tiny_vlm

RULE = "replaces budget= and layer="


@pytest.mark.parametrize("single", [{"budget": 64}, {"layer": 1}, {"budget": 8, "layer": 2}])
def test_a_schedule_beside_a_budget_or_layer_is_refused_by_the_config_as_by_wrap(single):
    schedule = ((1, 6), (2, 3))
    with pytest.raises(ValueError, match=RULE):
        PruneConfig(schedule=schedule, **single)  # budget=64, the default's value, included
    with pytest.raises(ValueError, match=RULE):
        pio_fvlm.wrap(tiny_vlm("llava"), schedule=schedule, **single)


def test_a_schedule_leaves_budget_and_layer_unset_and_without_one_they_are_the_authors():
    assert (PruneConfig().budget, PruneConfig().layer) == (64, 1)
    scheduled = PruneConfig(schedule=((1, 6), (2, 3)))
    assert (scheduled.budget, scheduled.layer) == (None, None)
    assert scheduled.stages() == ((1, 6), (2, 3))


def test_replace_keeps_the_stages_given():
    single = PruneConfig(budget=8, layer=2)
    scheduled = single.replace(schedule=((1, 6), (2, 3)))
    assert (scheduled.budget, scheduled.layer, scheduled.schedule) == (None, None, ((1, 6), (2, 3)))
    back = scheduled.replace(budget=5)
    assert (back.budget, back.layer, back.schedule) == (5, 1, None)
    with pytest.raises(ValueError, match=RULE):
        single.replace(schedule=((1, 6),), budget=4)


def test_settings_from_refuses_a_setting_given_two_ways():
    with pytest.raises(ValueError, match="either preset= or schedule="):
        settings_from({"schedule": ((1, 4),)}, "paper-64", None)
    with pytest.raises(ValueError, match="not both"):
        settings_from({"budget": 4}, None, PruneConfig())
    config, given = settings_from({"budget": 4, "nms_threshold": 0.7}, None, None)
    assert (config.budget, config.nms_threshold, given) == (4, 0.7, frozenset({"budget", "nms_threshold"}))


def _hooks(model):
    return [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in model.modules()]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_planning_changes_nothing_on_the_model(family):
    model = tiny_vlm(family)
    inputs = standard_batch(model)
    with torch.no_grad():
        before = model(**inputs).logits
    hooks, methods = _hooks(model), {k for m in model.modules() for k in vars(m)}
    plan = plan_pruning(model, PruneConfig(budget=4, layer=2))
    assert _hooks(model) == hooks and {k for m in model.modules() for k in vars(m)} == methods
    assert not pio_fvlm.is_wrapped(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert [(s.layer, s.budget) for s in plan.stages] == [(2, 4)]
    assert isinstance(plan.stages[0].selector, PioSelector)
    assert (plan.family_patches is not None) == family.startswith("qwen3_vl")  # DeepStack's stand-in


def test_wrap_is_its_plan_installed():
    """wrap = plan_pruning + the runtime built from it: the same stages, and the same tokens kept."""
    model = tiny_vlm("qwen2_5_vl", num_layers=6)
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, schedule=[(1, 6), (3, 3)], nms_threshold=0.7)
    info = pio_fvlm.describe(model)
    with torch.no_grad():
        model(**inputs)
    kept = pio_fvlm.last_selection(model)
    pio_fvlm.unwrap(model)
    plan = plan_pruning(model, PruneConfig(schedule=((1, 6), (3, 3)), nms_threshold=0.7))
    assert [(s.layer, s.budget) for s in plan.stages] == list(info.stages)
    pio_fvlm.api.attach(model, runtime_for(plan))
    with torch.no_grad():
        model(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(pio_fvlm.last_selection(model), kept))
    pio_fvlm.unwrap(model)


@pytest.mark.parametrize("selector", [UniformSelector(), RandomSelector(seed=3)])
def test_a_selector_that_reads_no_hidden_states_prunes_from_layer_0(selector):
    model = tiny_vlm("llava")
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=5, layer=0, selector=selector)
    with torch.no_grad(), layer_lengths(model) as seen:
        model(**inputs)
    length = inputs["input_ids"].shape[1]
    assert seen == dict.fromkeys(range(4), length - n_visual(inputs)[0] + 5)  # every layer, layer 0 included
    assert pio_fvlm.describe(model).stages == ((0, 5),)
    pio_fvlm.unwrap(model)


@pytest.mark.parametrize("selector", [None, PioSelector(), FastVSelector()])
def test_a_selector_that_scores_hidden_states_is_refused_at_layer_0(selector):
    model = tiny_vlm("llava")
    with pytest.raises(ValueError, match=r"pass 1 <= layer <= 3 \(layer 0 must see every token"):
        pio_fvlm.wrap(model, budget=5, layer=0, selector=selector)
    with pytest.raises(ValueError, match=r"each layer must be an int in 1\.\.3"):
        pio_fvlm.wrap(model, schedule=[(0, 5)], selector=selector)
    assert not pio_fvlm.is_wrapped(model)


def test_an_encoder_mode_owns_layer_0():
    model = tiny_vlm("llava")
    with pytest.raises(ValueError, match="already reduces the visual tokens before layer 0"):
        pio_fvlm.wrap(model, budget=5, layer=0, selector=UniformSelector(), encoder="visionzip", encoder_budget=8)
    plan = plan_pruning(model, PruneConfig(budget=5, encoder="visionzip", encoder_budget=8))
    assert [s.layer for s in plan.stages] == [0, 1] and plan.extra_hooks
    assert plan.stages[1] == Stage(1, 5, plan.stages[1].selector)
    assert not pio_fvlm.is_wrapped(model) and _hooks(model) == _hooks(tiny_vlm("llava"))


def test_an_encoder_mode_owns_layer_0_in_a_schedule_too():
    model = tiny_vlm("llava")
    with pytest.raises(ValueError, match="already reduces the visual tokens before layer 0"):
        plan_pruning(model, PruneConfig(schedule=((0, 6), (2, 3)), encoder="visionzip", encoder_budget=8),
                     UniformSelector())


@pytest.mark.parametrize("settings, words", [({"encoder_budget": 8}, "needs an encoder mode: pass encoder="),
                                             ({"encoder": "visionzip"}, "needs encoder_budget")])
def test_an_encoder_setting_alone_is_refused_when_planned(settings, words):
    with pytest.raises(ValueError, match=words):
        plan_pruning(tiny_vlm("llava"), PruneConfig(budget=5, **settings))


def test_a_plan_is_a_value():
    plan = plan_pruning(tiny_vlm("llava"), PruneConfig(budget=5))
    with pytest.raises(AttributeError):
        plan.stages[0].layer = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        plan.stages = ()  # type: ignore[misc]
