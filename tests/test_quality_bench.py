"""The quality benchmark (benchmarks/quality.py) runs end to end and its bookkeeping is exact:
the oracle keeps the asked-about objects' tokens first, so the share of those tokens kept must
be min(1, budget / their count) per question (this checks the left-padding offsets too)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import load_script
from pio_fvlm import shapes_vlm as sv
from pio_fvlm import synthetic as syn


def load_quality():
    return load_script("benchmarks/quality.py")


def test_quality_benchmark_runs_and_counts_kept_object_tokens_exactly(tmp_path, capsys):
    quality = load_quality()
    out = tmp_path / "q.json"
    budget, n = 16, 10
    result = quality.main(["--items", str(n), "--budgets", str(budget), "--variants", "pio", "oracle (layer 1)",
                           "--out", str(out)])
    assert torch.is_grad_enabled()  # the benchmark leaves the caller's grad mode alone
    # progress as it goes: all tokens, blank, two floors, then 2 variants x 1 budget
    progress = capsys.readouterr().err
    assert "evaluations: 100%" in progress and "6/6" in progress
    assert 0 < result["answer_prior"] < 1 and 0 <= result["blank"] <= 1
    expected = []
    for (_, objects, qa), owners in sv.eval_set_with_owners(n):
        targets = syn.question_objects(qa, objects)
        if targets:
            expected.append(min(1.0, budget / np.isin(owners, targets).sum()))
    assert result["share_of_object_tokens_kept"]["oracle (layer 1)"][budget] == pytest.approx(np.mean(expected))
    # the saved result renders as the docs' table: one row per variant
    table = quality.main(["--table", str(out)])
    assert table["accuracy"].keys() == result["accuracy"].keys()
    lines = quality.markdown_table(result).splitlines()
    assert len(lines) == 2 + 2 and lines[2].startswith("| pio (layer 1, authors' defaults) |")


def test_answer_prior_is_the_best_constant_answer_per_question_type():
    quality = load_quality()
    split = [(None, [], syn.QA("count", "q", a)) for a in ("one", "one", "two")]
    split += [(None, [], syn.QA("presence", "q", a)) for a in ("yes", "no", "no", "no")]
    assert quality.answer_prior(split) == pytest.approx((2 + 3) / 7)


def test_quality_benchmark_never_overwrites_the_shipped_record_for_another_model(tmp_path):
    quality = load_quality()
    assert quality.default_out(sv.ASSET_DIR) == Path("benchmarks/results/quality.json")
    assert quality.default_out(tmp_path / "run") == tmp_path / "run" / "quality.json"


def test_quality_benchmark_loads_the_model_in_the_dtype_and_backend_asked_for():
    quality = load_quality()
    args = quality.parse_args(["--dtype", "bfloat16", "--attn", "eager"])
    model = quality.load_model(args)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert str(model.device) == "cpu"
