"""The benchmark's high-resolution and video shapes: real visual-token counts, pruned end to end."""

import pytest
import torch

import pio_fvlm
from pio_fvlm import bench
from pio_fvlm.bench_models import SHAPES, shape_inputs, visual_token_id
from pio_fvlm.measure import layer_lengths

CPU_SHAPES = {"miniature": 576, "llava-672": 2304, "llava-next": 2928, "qwen2.5-vl-1344": 2304,
              "qwen2.5-vl-video": 4096, "llava-onevision": 7371, "internvl-7-tiles": 1792,
              "qwen3-vl-1024": 1024}


@pytest.mark.parametrize("name", list(CPU_SHAPES))
def test_cpu_shape_has_the_real_token_count_and_prunes(name):
    shape = SHAPES[name]
    model = shape.build("sdpa", torch.float32, "cpu", 2)
    inputs = shape_inputs(model, shape, batch=1, text_tokens=20)
    n_visual = int((inputs["input_ids"] == visual_token_id(model, shape)).sum())
    assert n_visual == CPU_SHAPES[name]
    budget = round(0.111 * n_visual)
    pio_fvlm.wrap(model, budget=budget)
    with torch.no_grad(), layer_lengths(model) as seen:
        out = model(**inputs)
    length = inputs["input_ids"].shape[1]
    assert seen == {0: length, 1: length - n_visual + budget}
    assert out.logits.shape[1] == length
    assert len(pio_fvlm.last_selection(model)[0]) == budget


def test_ideal_mode_prunes_before_layer_0():
    shape = SHAPES["qwen2.5-vl-1344"]
    model = shape.build("sdpa", torch.float32, "cpu", 2)
    inputs = shape_inputs(model, shape, batch=2, text_tokens=20)
    bench.prune_before_layer_0(model, 100)
    with torch.no_grad(), layer_lengths(model) as seen:
        model(**inputs)
    assert seen == {0: inputs["input_ids"].shape[1] - 2304 + 100, 1: inputs["input_ids"].shape[1] - 2304 + 100}
    pio_fvlm.unwrap(model)
    with torch.no_grad(), layer_lengths(model) as seen:
        model(**inputs)
    assert seen[0] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("name,hidden,layers", [("llava-next-7b", 4096, 32), ("qwen2.5-vl-7b", 3584, 28),
                                                ("qwen2.5-vl-7b-video", 3584, 28), ("llava-1.5-7b", 4096, 32),
                                                ("llava-onevision-7b", 3584, 28), ("internvl3-8b", 3584, 28),
                                                ("qwen3-vl-8b", 4096, 36)])
def test_7b_shapes_build_on_meta(name, hidden, layers):
    shape = SHAPES[name]
    assert not shape.cpu_miniature
    model = shape.build("sdpa", torch.bfloat16, "meta", None)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (hidden, layers)
    assert pio_fvlm.wrap(model, budget=64) is model  # the adapter finds every part


@pytest.mark.slow
def test_bench_runs_a_large_shape_with_its_default_budget(tmp_path):
    result = bench.main(["--shapes", "qwen2.5-vl-1344", "--num-layers", "2", "--reps", "1", "--e2e-reps", "0",
                         "--text-tokens", "20", "--out", str(tmp_path)])
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"full", "pio-256", "ideal-256", "free-256", "pio-2304"}  # 11.1 % of 2,304
    assert (tmp_path / "speed-cpu-qwen2.5-vl-1344-b1.json").exists()
    checks = result["checks"]
    assert checks["pruned_layer_kv_ratio"] == pytest.approx(checks["pruned_layer_kv_expected"], rel=1e-12)
    assert 0 < rows["pio-256"]["selection_peak_mb"] < rows["full"]["transient_peak_mb"]
    assert rows["ideal-256"]["gflops"] < rows["free-256"]["gflops"] < rows["full"]["gflops"]
