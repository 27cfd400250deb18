"""benchmarks/gpu_check.py and benchmarks/selection_breakdown.py run on a GPU only when there is one;
here their measuring functions run on tiny models in float32, where what they record must come
out exact (on a GPU in bf16 the same numbers are measurements, not assertions)."""

from __future__ import annotations

import pytest

import pio_fvlm
from helpers import load_script
from tiny_models import tiny_vlm


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpu_check_correctness_is_exact_in_float32(family: str, attn: str) -> None:
    gpu_check = load_script("benchmarks/gpu_check.py")
    model = tiny_vlm(family, attn_implementation=attn)
    result = gpu_check.correctness(model, family, budget=8, new_tokens=4, small=True)
    n_visual = result["visual_tokens"]
    assert n_visual == 16
    full = 5 + n_visual + (2 if family.startswith("qwen") else 0) + 24  # text, image (Qwen: start/end), text
    assert result["pass_through_max_diff"] == 0.0
    assert result["layer_lengths"] == [full] + [full - (n_visual - 8)] * 3  # pruned from layer 1 on
    agree = result["batch_vs_alone"]
    assert agree["tokens_agree_pio"] == [4, 4] and agree["tokens_agree_unwrapped"] == [4, 4]
    assert agree["kept_shared"] == [8, 8]
    assert len(result["kept_one"]) == 8 and all(0 <= i < n_visual for i in result["kept_one"])
    assert not pio_fvlm.is_wrapped(model)


def test_selection_breakdown_times_the_probe_and_the_nms_of_a_captured_request() -> None:
    breakdown = load_script("benchmarks/selection_breakdown.py")
    model = tiny_vlm("llava")
    row = breakdown.breakdown(model, batch_size=2, budget=8, reps=2, small=True)
    assert row["batch"] == 2
    assert row["nms_prefixes_walked"] and all(0 < m <= 45 for m in row["nms_prefixes_walked"])
    assert all(row[f"{part}_ms_median"] > 0 for part in ("probe", "nms", "selection"))
    assert not pio_fvlm.is_wrapped(model)


@pytest.mark.parametrize("name, width", [("llava-1.5-7b", 4096), ("qwen2.5-vl-7b", 3584)])
def test_gpu_check_builds_the_real_shapes_in_the_dtype_asked_for(name: str, width: int) -> None:
    import torch

    gpu_check = load_script("benchmarks/gpu_check.py")
    model = gpu_check.build(name, small=False, dtype=torch.bfloat16, device="meta")  # shapes only, no memory
    assert model.config.text_config.hidden_size == width and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert torch.get_default_dtype() == torch.float32  # restored after the build


def test_gpu_table_row_runs_the_bench_at_the_shape_budget() -> None:
    """--table --small: the same row code on the CPU miniature of LLaVA-1.5-7B (2 layers)."""
    gpu_check = load_script("benchmarks/gpu_check.py")
    row = gpu_check.table_row("llava-1.5-7b", 1, False, "sdpa", "float32", "cpu", small=True, reps=1)
    assert (row["visual"], row["budget"]) == (576, 64)
    assert row["pio_prefill_ms"] > 0 and row["ideal_prefill_ms"] > 0
    assert 0 < row["extra_kernel_ops"] <= 150 and row["extra_host_syncs"] <= 2
    assert row["selection_peak_mib"] > 0
