"""Small things a user meets: number types for settings, the pruned() block, last_selection after
text-only calls, and a config module that depends on nothing else in the package."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import pio_fvlm
from helpers import standard_batch
from tiny_models import tiny_vlm


def _kept(model, inputs):
    with torch.no_grad():
        model(**inputs)
    return [s.tolist() for s in pio_fvlm.last_selection(model)]


@pytest.fixture(scope="module")
def model():
    return tiny_vlm("llava", seed=11)


@pytest.mark.parametrize("budget", [np.int64(4), np.int32(4), torch.tensor(4)])
def test_budget_accepts_numpy_and_tensor_integers(model, budget):
    inputs = standard_batch(model)
    want = _kept(pio_fvlm.wrap(model, budget=4), inputs)
    got = _kept(pio_fvlm.wrap(model, budget=budget), inputs)
    assert got == want
    assert type(pio_fvlm.get_config(model).budget) is int
    pio_fvlm.unwrap(model)


@pytest.mark.parametrize("budget", [np.float64(0.25), torch.tensor(0.25, dtype=torch.float64)])
def test_budget_accepts_numpy_and_tensor_fractions(model, budget):
    inputs = standard_batch(model)
    want = _kept(pio_fvlm.wrap(model, budget=0.25), inputs)
    assert _kept(pio_fvlm.wrap(model, budget=budget), inputs) == want
    assert pio_fvlm.get_config(model).budget == 0.25
    pio_fvlm.unwrap(model)


def test_other_integer_settings_accept_numpy(model):
    pio_fvlm.wrap(model, budget=4, layer=np.int64(2), proxy_tokens=np.int64(3))
    config = pio_fvlm.get_config(model)
    assert (config.layer, config.proxy_tokens) == (2, 3) and type(config.layer) is int
    pio_fvlm.wrap(model, schedule=[(np.int64(1), np.int64(6)), (2, 3)])
    assert pio_fvlm.get_config(model).schedule == ((1, 6), (2, 3))
    pio_fvlm.unwrap(model)


@pytest.mark.parametrize("bad", [True, np.bool_(True), torch.tensor([4, 5]), "64"])
def test_budget_still_refuses_non_numbers(model, bad):
    with pytest.raises(TypeError, match="budget must be a number"):
        pio_fvlm.wrap(model, budget=bad)
    assert not pio_fvlm.is_wrapped(model)


def test_pruned_block_wraps_and_restores(model):
    inputs = standard_batch(model)
    with pio_fvlm.pruned(model, budget=3) as same:
        assert same is model and pio_fvlm.get_config(model).budget == 3
        assert all(len(s) == 3 for s in _kept(model, inputs))
    assert not pio_fvlm.is_wrapped(model)
    # a model wrapped before the block gets its own settings back, even after an error inside
    pio_fvlm.wrap(model, budget=5, nms_threshold=None)
    with pytest.raises(RuntimeError, match="inside"), pio_fvlm.pruned(model, budget=2, layer=2):
        assert pio_fvlm.get_config(model).layer == 2
        raise RuntimeError("inside")
    config = pio_fvlm.get_config(model)
    assert (config.budget, config.nms_threshold, config.layer) == (5, None, 1)
    assert all(len(s) == 5 for s in _kept(model, inputs))
    pio_fvlm.unwrap(model)
    with torch.no_grad():
        plain = model(**inputs).logits
    assert not pio_fvlm.is_wrapped(model)
    assert plain.shape[1] == inputs["input_ids"].shape[1]


def test_last_selection_is_left_alone_by_text_only_calls(model):
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=3)
    kept = _kept(model, inputs)
    text = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        model(**text)
    assert [s.tolist() for s in pio_fvlm.last_selection(model)] == kept
    pio_fvlm.unwrap(model)


def test_config_module_imports_nothing_from_the_package():
    source = Path(pio_fvlm.config.__file__).read_text()
    relative = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert relative == []


def test_every_cli_option_has_help(monkeypatch):
    import argparse

    from pio_fvlm import cli

    parsers = []

    def record(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", record)
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([command])
    assert len(parsers) == len(cli.COMMANDS)
    for parser in parsers:
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{parser.prog} {action.option_strings[0]} has no help text"


def test_hidden_states_and_attentions_of_pruned_layers_are_shorter():
    """Documented next to the settings: pruned layers report their shortened sequence."""
    model = tiny_vlm("llava", seed=12, attn_implementation="eager")
    inputs = standard_batch(model)
    length = inputs["input_ids"].shape[1]
    short = length - min((inputs["input_ids"] == 3).sum(1).tolist()) + 4
    pio_fvlm.wrap(model, budget=4)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert [h.shape[1] for h in out.hidden_states] == [length, length, short, short, length]
    assert [a.shape[-1] for a in out.attentions] == [length, short, short, short]
    assert out.logits.shape[1] == length


def test_visual_token_counts_follow_the_adapters_ids():
    """One count for the CLI, the benchmark and the runtime: images and videos (OneVision), per row."""
    from helpers import n_visual
    from pio_fvlm.models import visual_token_counts
    from tiny_models import Prompt, make_batch, tiny_vlm

    model = tiny_vlm("llava_onevision")
    batch = make_batch(model, [Prompt([5], [9, 10], videos=1), Prompt([5, 6], [9], images=2)])
    counts = visual_token_counts(model, batch["input_ids"])
    assert counts == n_visual(batch) and counts[0] > counts[0] - int((batch["input_ids"][0] == 4).sum()) > 0
