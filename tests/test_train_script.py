"""The training script's one-run recipe (``--vision-first`` / ``--freeze-tower``), run for a few
tiny steps in a subprocess: which parts each stage trains, and that a resume continues it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_vlm as tv  # training/, on the test path
from helpers import load_script

pytestmark = pytest.mark.slow  # each test runs the training script for a few steps

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_tiny_vlm.py"


def _train(out: Path, steps: int, *extra: str) -> None:
    args = [sys.executable, str(SCRIPT), "--out", str(out / "model"), "--state-dir", str(out / "state"),
            "--steps", str(steps), "--batch", "2", "--pairs", "2", "--eval-every", "1000", "--save-every", "1",
            "--vision-first", "2", "--vision-layers", "3", "--freeze-tower", "--focus", "1.0", "--drop", "0.5",
            *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _load(folder: Path) -> torch.nn.Module:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], part: str) -> set[str]:
    return {name for name in before if part in name and not torch.equal(before[name], after[name])}


def test_vision_first_trains_the_tower_then_the_language_model_with_the_tower_frozen(tmp_path: Path) -> None:

    fresh = tv.build_model(vision_layers=3).state_dict()
    _train(tmp_path, 2)  # the vision-only stage: steps 0 and 1
    model = _load(tmp_path / "model")
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    assert len(tower.encoder.layers) == 3  # built with 3 random layers, not grown
    first = model.state_dict()
    assert _changed(fresh, first, "vision_tower"), "the vision-only stage did not train the tower"
    assert _changed(fresh, first, "multi_modal_projector"), "the vision-only stage did not train the projector"
    assert not _changed(fresh, first, "language_model"), "the vision-only stage changed the language model"

    _train(tmp_path, 3)  # resumes at step 2: the joint stage, tower frozen
    second = _load(tmp_path / "model").state_dict()
    assert not _changed(first, second, "vision_tower"), "--freeze-tower let the tower change"
    assert _changed(first, second, "multi_modal_projector")
    assert _changed(first, second, "language_model"), "the joint stage did not train the language model"
    info = json.loads((tmp_path / "model" / "training_state.json").read_text())
    assert info["step"] == 3 and [run["from_step"] for run in info["runs"]] == [0, 2]


def test_stem_pooled_shape_target_and_a_tower_learning_rate_of_its_own(tmp_path: Path) -> None:

    args = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "model"), "--state-dir", str(tmp_path / "state"),
            "--batch", "2", "--pairs", "2", "--eval-every", "1000", "--save-every", "1", "--vision-first", "1",
            "--vision-layers", "3", "--stem", "--aux-shape", "pooled", "--aux-shape-both-from", "1", "--tower-lr", "0"]
    # the vision-only step (pooled shape target), then (resumed) a joint step with the tower at lr 0 (both targets)
    for steps in ("1", "2"):
        done = subprocess.run([*args, "--steps", steps], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        if steps == "1":
            first = _load(tmp_path / "model").state_dict()
    stemmed = tv.build_model(vision_layers=3)
    tv.oriented_edge_stem(stemmed)
    name = next(n for n in first if n.endswith("embeddings.patch_embedding.weight"))
    start = stemmed.state_dict()[name]
    # one warmup step (lr 1e-5) away from the stem, and far from the random filters it replaced
    assert torch.allclose(first[name][:72], start[:72], atol=1e-3)
    assert not torch.allclose(tv.build_model(vision_layers=3).state_dict()[name][:72], start[:72], atol=1e-2)
    second = _load(tmp_path / "model").state_dict()
    assert not _changed(first, second, "vision_tower"), "--tower-lr 0 let the tower change in the joint stage"
    assert _changed(first, second, "language_model") and _changed(first, second, "multi_modal_projector")


def _script_module():
    """The training script imported as a module, for its pure helpers (schedules)."""
    return load_script("training/train_tiny_vlm.py")


def test_seed_changes_the_run_and_seed_zero_is_the_default(tmp_path: Path) -> None:
    runs = {"default": (), "zero": ("--seed", "0"), "one": ("--seed", "1")}
    weights = {}
    for name, extra in runs.items():
        _train(tmp_path / name, 3, *extra)  # two vision steps and one joint step
        weights[name] = _load(tmp_path / name / "model").state_dict()
    assert all(torch.equal(weights["default"][k], weights["zero"][k]) for k in weights["default"])
    assert not all(torch.equal(weights["default"][k], weights["one"][k]) for k in weights["default"])


def test_focus_relative_adds_its_term_and_needs_focus(tmp_path: Path) -> None:
    weights = {}
    for name, extra in {"plain": (), "relative": ("--focus-relative", "1.0")}.items():
        _train(tmp_path / name, 3, "--ramp", "0", *extra)  # up to 4 objects from the start
        weights[name] = _load(tmp_path / name / "model").state_dict()
    changed = _changed(weights["plain"], weights["relative"], "language_model")
    assert changed, "--focus-relative did not change the joint step"
    args = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "bad"), "--steps", "1", "--focus-relative", "1.0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "give --focus too" in done.stderr


def test_tower_learning_rate_is_its_own_in_the_vision_stage_and_after() -> None:
    import argparse

    script = _script_module()
    args = argparse.Namespace(vision_first=400, vision_only=False, vision_lr=2e-3, lr=1.5e-3, steps=3400,
                              tower_lr=2e-4, restart_at=None, restart_lr=None)
    # the vision stage's peak (step 199: end of warmup): heads at --vision-lr, the tower at --tower-lr
    tower, rest = script.learning_rates(199, args, start=400)
    assert math.isclose(rest, 2e-3) and math.isclose(tower, 2e-4)
    # the joint stage's peak (step 400 + 199): the rest at --lr, the tower at --tower-lr
    tower, rest = script.learning_rates(599, args, start=400)
    assert math.isclose(rest, 1.5e-3) and math.isclose(tower, 2e-4)
    # the tower follows the stage's cosine: a tenth of its peak at the end of the vision stage
    tower, rest = script.learning_rates(399, args, start=400)
    assert math.isclose(tower, 2e-5, rel_tol=1e-3) and math.isclose(rest, 2e-4, rel_tol=1e-3)
    args.tower_lr = None  # without --tower-lr the tower learns as the rest in both stages
    assert script.learning_rates(199, args, start=400) == (2e-3, 2e-3)
    assert script.learning_rates(599, args, start=400) == (1.5e-3, 1.5e-3)


def test_restart_at_warms_the_rate_up_again_inside_the_run() -> None:
    import argparse

    script = _script_module()
    args = argparse.Namespace(vision_first=400, vision_only=False, vision_lr=2e-3, lr=1.5e-3, steps=3400,
                              tower_lr=2e-4, restart_at=2600, restart_lr=1e-3)
    before = script.learning_rates(2599, args, start=400)
    assert math.isclose(before[1], script.lr_at(2599, 3400, 1.5e-3, start=400))  # the first cosine, ~4e-4
    # a fresh warmup from the restart step: 1/200 of the new peak, the peak after 200 steps ...
    assert math.isclose(script.learning_rates(2600, args, start=400)[1], 1e-3 / 200)
    tower, rest = script.learning_rates(2799, args, start=400)
    assert math.isclose(rest, 1e-3) and math.isclose(tower, 2e-4)  # the tower keeps its own peak
    # ... and down to a tenth of it at the run's last step
    assert math.isclose(script.learning_rates(3400, args, start=400)[1], 1e-4, rel_tol=1e-6)
    args.restart_lr = None  # default peak: --lr
    assert math.isclose(script.learning_rates(2799, args, start=400)[1], 1.5e-3)


def test_pooled_shape_target_becomes_both_at_the_given_step() -> None:
    import argparse

    script = _script_module()
    args = argparse.Namespace(aux_shape="pooled", aux_shape_both_from=1400)
    assert [script.aux_shape_at(s, args) for s in (0, 1399, 1400, 3000)] == ["pooled", "pooled", "both", "both"]
    args.aux_shape_both_from = None  # without the flag the target never changes
    assert {script.aux_shape_at(s, args) for s in (0, 1400, 3000)} == {"pooled"}
    # the switch only makes sense from the pooled target: anything else is refused with a message
    run = subprocess.run([sys.executable, str(SCRIPT), "--aux-shape", "patch", "--aux-shape-both-from", "10"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "needs --aux-shape pooled" in run.stderr


def test_parameter_groups_split_the_tower_from_the_rest_with_the_heads_last() -> None:

    script = _script_module()
    model = tv.build_model()
    head_a, head_b = torch.nn.Linear(4, 2), torch.nn.Linear(2, 3)
    tower, rest = script.parameter_groups(model, head_a, head_b)
    assert [id(t) for t in tower] == [id(t) for t in model.model.vision_tower.parameters()]
    in_tower = {id(t) for t in tower}
    assert [id(t) for t in rest[:-4]] == [id(t) for t in model.parameters() if id(t) not in in_tower]
    # the heads come last, so a saved optimizer state indexes the model's parameters the same with or without them
    assert [id(t) for t in rest[-4:]] == [id(t) for t in [*head_a.parameters(), *head_b.parameters()]]
    assert len({id(t) for t in tower + rest}) == len(tower) + len(rest)
