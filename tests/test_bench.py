"""The speed benchmark runs end to end and its exact (non-timing) columns are right.

Timings are not asserted (this machine is noisy; speed targets live in benchmarks/): only the
quantities that must hold exactly whatever the machine does.
"""

import json

import pytest
import torch

from pio_fvlm import bench
from pio_fvlm.checkpoint_configs import llava15_7b_config


def test_bench_runs_and_reports_exact_cache_and_flop_ratios(tmp_path):
    result = bench.main(["--num-layers", "2", "--budgets", "64", "--reps", "1", "--e2e-reps", "1",
                         "--new-tokens", "2", "--out", str(tmp_path), "--tag", "t"])
    assert torch.is_grad_enabled()  # the benchmark leaves the caller's grad mode alone
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["checks"] == pytest.approx(result["checks"], nan_ok=True)
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"full", "pio-64", "ideal-64", "naive-64", "free-64", "pio-576"}
    # the pruned layer caches exactly text + 64 tokens (50 text tokens around 576 visual ones)
    assert result["checks"]["pruned_layer_kv_ratio"] == pytest.approx((50 + 64) / (50 + 576), rel=1e-12)
    # the no-op budget changes nothing that can be counted
    assert rows["pio-576"]["kv_bytes"] == rows["full"]["kv_bytes"]
    assert rows["pio-576"]["gflops"] == pytest.approx(rows["full"]["gflops"])
    # same kept count, different selection cost: equal caches; FLOPs ordered free < pio < naive
    # (with only 2 layers the naive probe's full-sequence head and backward outweigh the pruning)
    assert rows["pio-64"]["kv_bytes"] == rows["free-64"]["kv_bytes"] == rows["naive-64"]["kv_bytes"]
    assert rows["ideal-64"]["kv_bytes"] < rows["pio-64"]["kv_bytes"]
    flops = [rows[m]["gflops"] for m in ("ideal-64", "free-64", "pio-64", "naive-64")]
    assert flops == sorted(flops) and len(set(flops)) == 4
    assert rows["pio-64"]["gflops"] < rows["full"]["gflops"]
    assert rows["pio-64"]["select_ms"] > 0 and rows["full"]["select_ms"] is None
    # one round: free's prefill over itself plus the selector time PIO adds over free's
    sel_pio, sel_free = rows["pio-64"]["select_ms"], rows["free-64"]["select_ms"]
    expected = rows["free-64"]["prefill_ms"] / (rows["free-64"]["prefill_ms"] + sel_pio - sel_free)
    assert result["checks"]["pio64_over_free64_by_selection"] == pytest.approx(expected, rel=1e-9)
    assert "pruned_layer_kv_ratio=0.182" in bench.format_table(result)
    # launch accounting: what pruning dispatches on top of the unpruned prefill
    checks = result["checks"]
    assert 0 < checks["pio64_extra_kernel_ops"] <= 150 and checks["pio64_extra_host_syncs"] <= 2
    assert checks["noop_extra_kernel_ops"] <= 3
    assert rows["pio-64"]["kernel_ops"] > rows["free-64"]["kernel_ops"] > 0
    assert "ops: kernel-launching aten ops" in bench.format_table(result)


def test_bench_llava15_7b_shapes_are_the_checkpoint_config():
    args = bench.parser().parse_args(["--shapes", "llava-1.5-7b", "--num-layers", "1"])
    assert args.shapes == "llava-1.5-7b"
    want = llava15_7b_config(text_layers=1)
    with torch.device("meta"):
        model = bench.random_llava15_7b("sdpa", torch.bfloat16, "meta", num_layers=1)
    assert model.config.text_config.hidden_size == want.text_config.hidden_size == 4096
    assert model.config.vision_config.image_size == 336 and model.config.text_config.num_hidden_layers == 1
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_bench_refuses_num_layers_with_a_checkpoint():
    with pytest.raises(SystemExit, match="--num-layers"):
        bench.run(bench.parser().parse_args(["--model", "some/checkpoint", "--num-layers", "2"]))


def test_ratio_by_selection_adds_only_the_selection_time_pio_spends_beyond_free():
    # rounds of 100 ms and 120 ms free prefills; PIO's selector takes 5.5 ms more than free's 0.5 ms
    ratio = bench.ratio_by_selection([0.100, 0.120, 0.100], [0.006, 0.0055, 0.006], [0.0005, 0.0005, 0.0005])
    assert ratio == pytest.approx(0.100 / 0.1055)
    assert bench.ratio_by_selection([0.1], [0.0], [0.0]) == 1.0  # a selection that costs what free's costs
    with pytest.raises(ValueError):  # rounds must pair up
        bench.ratio_by_selection([0.1, 0.1], [0.01], [0.0])
