"""training/evaluate_tiny_vlm.py: the splits docs/quality.md reports on, and its output format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO, load_script


def _evaluation():
    return load_script("training/evaluate_tiny_vlm.py")


def _keys(items: list) -> list:
    """What identifies a question: its scene's objects, the question and the answer."""
    return [(tuple(objects), qa) for _, objects, qa in items]


def test_validation_split_is_the_training_scripts_and_blank_reuses_the_test_questions() -> None:
    from pio_fvlm import shapes_vlm as sv

    evaluation = _evaluation()
    # the training script validates on the same seed's first 150 questions
    assert "sv.eval_set(150, seed=sv.VALIDATION_SEED)" in (REPO / "training" / "train_tiny_vlm.py").read_text()
    split = evaluation.splits(scale=0.05)
    assert {name: len(items) for name, (items, _) in split.items()} == {
        "val600": 30, "test300": 15, "blank300": 15, "seed555123": 30}
    assert [blank for _, blank in split.values()] == [False, False, True, False]
    assert split["blank300"][0] is split["test300"][0]
    trained_on = sv.eval_set(10, seed=sv.VALIDATION_SEED)  # what the script's 150-question check starts with
    assert _keys(split["val600"][0][:10]) == _keys(trained_on)
    assert _keys(split["test300"][0]) == _keys(sv.eval_set(15))
    assert _keys(split["test300"][0][:10]) != _keys(trained_on)
    assert _keys(split["seed555123"][0][:10]) != _keys(trained_on)


def test_shipped_checkpoint_reads_images_and_lines_parse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evaluation = _evaluation()
    out = tmp_path / "eval.json"
    results = evaluation.main(["--scale", "0.05", "--out", str(out)])  # the shipped checkpoint, 15 test questions
    printed = capsys.readouterr()
    assert "splits: 100%" in printed.err and "4/4" in printed.err  # progress as it goes
    lines = dict(line.split(" ", 1) for line in printed.out.splitlines())
    assert list(lines) == ["val600", "test300", "blank300", "seed555123"]
    assert json.loads(lines["test300"])["all"] == round(results["test300"]["all"], 3)
    assert json.loads(out.read_text()) == results
    # the shipped checkpoint answers from the image: far above its blank-image accuracy (~0.3)
    assert results["test300"]["all"] >= 0.8 > 0.5 > results["blank300"]["all"]


def test_scale_outside_zero_one_is_refused() -> None:
    with pytest.raises(SystemExit):
        _evaluation().main(["--scale", "0"])
