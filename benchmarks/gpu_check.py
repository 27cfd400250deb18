"""GPU checks in one run, no download: LLaVA-1.5-7B's and Qwen2.5-VL-7B's real shapes with random weights.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu   # bf16 on one GPU, a few minutes
    python benchmarks/gpu_check.py --small --device cpu --dtype float32 --out /tmp/gpu-smoke   # same code, tiny

For each model and attention backend (sdpa, eager) it records, as measured numbers (nothing asserted):

* ``pass_through_max_diff``: logits of ``wrap(budget=<all visual tokens>)`` vs the unwrapped model;
* ``layer_lengths``: the sequence each decoder layer receives under ``budget`` (text + kept from layer 1);
* ``batch_vs_alone``: a left-padded batch of two prompts of different lengths vs each prompt alone, greedy
  generate: tokens that agree, and kept visual tokens shared (positions relative to the image), for the
  wrapped model and, as the bf16 noise floor, the unwrapped one;
* ``backend_kept_overlap``: kept tokens shared by the sdpa and eager runs of one prompt;
* ``sdpa_flash_only``: the wrapped model's generate with PyTorch's SDPA restricted to its FlashAttention
  kernel (batch 1, no padding), and whether its tokens equal the default SDPA's. This is *not* the
  ``flash-attn`` package (``attn_implementation="flash_attention_2"``), which needs a build we do not have;
* ``timing``: prefill and generate (``--new-tokens`` greedy, with cache) medians, full vs ``wrap(budget)``,
  at batch 1 and ``--batch``, with peak memory. Random weights: generate runs all ``--new-tokens``
  (``min_new_tokens``), so the work is the same as for a real checkpoint.

Writes ``gpu-check-<dtype>.json`` under ``--out``. Real checkpoints: ``pio-fvlm run --model ...`` (README).

``--table`` instead measures the speed table in one run (random weights at the real shapes, built on
the device, nothing downloaded; a few minutes on one large GPU):

    python benchmarks/gpu_check.py --table --out benchmarks/results/gpu

rows :data:`TABLE`: LLaVA-1.5-7B at batch 1 (eager probe and ``capture=True``) and 8, LLaVA-NeXT-7B
(a 672 x 672 image, 2,928 tokens) and Qwen2.5-VL-7B (a 32-frame video, 4,096 tokens) at batch 1,
each through ``pio-fvlm bench`` (full / pio / free / ideal prefill, kernel ops, memory) at 11.1 % of
the visual tokens; with ``flash-attn`` importable, LLaVA-1.5-7B again with ``flash_attention_2``.
Writes ``gpu-table-<dtype>.json`` and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import pio_fvlm
from pio_fvlm.measure import layer_lengths, synchronize, timed

QWEN_FULL_GRID = (1, 48, 48)  # a 672 x 672 image: 2,304 patches, 576 tokens after the 2 x 2 merge
QWEN_SMALL_GRID = (1, 8, 8)


def build(name: str, small: bool, dtype: torch.dtype, device: str) -> nn.Module:
    """``name`` in {llava-1.5-7b, qwen2.5-vl-7b}: real shapes (or tiny ones with ``small``), random weights,
    built directly on ``device`` in ``dtype``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pio_fvlm.bench import miniature_llava, random_llava15_7b
    from pio_fvlm.bench_models import miniature_qwen2_5_vl
    from pio_fvlm.checkpoint_configs import build_on_device, qwen2_5_vl_7b_config

    torch.manual_seed(0)
    if small:
        model = (miniature_llava(num_layers=4) if name == "llava-1.5-7b"
                 else miniature_qwen2_5_vl("sdpa", dtype, num_layers=4, hidden=64))
        return model.to(device=device, dtype=dtype).eval()
    if name == "llava-1.5-7b":
        return random_llava15_7b("sdpa", dtype, device)
    config = qwen2_5_vl_7b_config()
    config._attn_implementation = "sdpa"
    return build_on_device(Qwen2_5_VLForConditionalGeneration, config, dtype, device)


def prompts_batch(model: nn.Module, texts: list[tuple[int, int]], small: bool) -> dict[str, torch.Tensor]:
    """Left-padded inputs: per sample, 5 text tokens, one image (the same pixels in every sample), then
    ``length`` text tokens drawn with ``seed``: ``texts`` = [(seed, length), ...]."""
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    special = {cfg.image_token_id, getattr(cfg, "video_token_id", None), getattr(cfg, "vision_start_token_id", None),
               getattr(cfg, "vision_end_token_id", None), 0}
    qwen = cfg.model_type.startswith("qwen")
    g = torch.Generator().manual_seed(0)
    if qwen:
        t, h, w = QWEN_SMALL_GRID if small else QWEN_FULL_GRID
        n_visual = t * h * w // cfg.vision_config.spatial_merge_size ** 2
        pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g)
    else:
        side = cfg.vision_config.image_size
        n_visual = (side // cfg.vision_config.patch_size) ** 2
        pixels = torch.randn(1, 3, side, side, generator=g)
    rows, kinds = [], []
    for seed, length in texts:
        r = torch.Generator().manual_seed(seed)
        words = [i if i not in special else 10 for i in torch.randint(10, min(vocab, 4000), (5 + length,),
                                                                      generator=r).tolist()]
        image = [cfg.vision_start_token_id, *[cfg.image_token_id] * n_visual, cfg.vision_end_token_id] if qwen \
            else [cfg.image_token_id] * n_visual
        row = words[:5] + image + words[5:]
        rows.append(row)
        kinds.append([1 if i == cfg.image_token_id else 0 for i in row])
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for i, (row, kind) in enumerate(zip(rows, kinds)):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        types[i, width - len(row):] = torch.tensor(kind)
    out = {"input_ids": ids, "attention_mask": mask}
    if qwen:
        out.update(pixel_values=pixels.repeat(len(rows), 1), image_grid_thw=torch.tensor([[t, h, w]] * len(rows)),
                   mm_token_type_ids=types)
    else:
        out["pixel_values"] = pixels.repeat(len(rows), 1, 1, 1)
    return {k: (v.to(model.dtype) if v.is_floating_point() else v).to(model.device) for k, v in out.items()}


def greedy(model: nn.Module, batch: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    """Generated ids only, ``new_tokens`` of them for every sample."""
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:]


def kept_relative(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[set[int]]:
    """Per sample, the kept visual tokens of the last prefill on ``batch`` (``pio_fvlm.last_selection``;
    decode steps leave it alone), as offsets from that sample's first visual token."""
    first = (batch["input_ids"] == model.config.image_token_id).int().argmax(dim=1)
    selection = pio_fvlm.last_selection(model) or []
    return [set((s.cpu() - int(f)).tolist()) for s, f in zip(selection, first)]


def correctness(model: nn.Module, name: str, budget: int, new_tokens: int, small: bool) -> dict[str, Any]:
    """The recorded numbers for one model and its current attention backend (see module docstring)."""
    one = prompts_batch(model, [(1, 24)], small)
    pair = prompts_batch(model, [(1, 24), (2, 9)], small)
    n_visual = int((one["input_ids"] == model.config.image_token_id).sum())
    result: dict[str, Any] = {"visual_tokens": n_visual}
    with torch.no_grad():
        full_logits = model(**one).logits.float()
        pio_fvlm.wrap(model, budget=n_visual)
        kept_all = model(**one).logits.float()
    result["pass_through_max_diff"] = float((full_logits - kept_all).abs().max())
    pio_fvlm.unwrap(model)
    full_batch, full_alone = greedy(model, pair, new_tokens), [greedy(model, prompts_batch(
        model, [t], small), new_tokens)[0] for t in [(1, 24), (2, 9)]]
    pio_fvlm.wrap(model, budget=budget)
    with torch.no_grad(), layer_lengths(model) as seen:
        model(**one)
    result["layer_lengths"] = [seen[i] for i in sorted(seen)]
    pio_batch = greedy(model, pair, new_tokens)
    kept_batch = kept_relative(model, pair)
    pio_alone, kept_alone = [], []
    for t in [(1, 24), (2, 9)]:
        alone = prompts_batch(model, [t], small)
        pio_alone.append(greedy(model, alone, new_tokens)[0])
        kept_alone.append(kept_relative(model, alone)[0])
    result["batch_vs_alone"] = {
        "tokens_agree_pio": [int((pio_batch[i] == pio_alone[i]).sum()) for i in range(2)],
        "tokens_agree_unwrapped": [int((full_batch[i] == full_alone[i]).sum()) for i in range(2)],
        "of_tokens": new_tokens,
        "kept_shared": [len(kept_batch[i] & kept_alone[i]) for i in range(2)],
        "of_kept": budget,
    }
    result["kept_one"] = sorted(kept_alone[0])
    pio_fvlm.unwrap(model)
    return result


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up
    return 1000 * statistics.median(timed(fn)[0] for _ in range(reps))


def timing(model: nn.Module, budget: int, batch_size: int, new_tokens: int, small: bool) -> dict[str, Any]:
    """Prefill and generate medians (ms) and peak memory (MiB, CUDA only), full vs wrapped."""
    batch = prompts_batch(model, [(s, 40) for s in range(batch_size)], small)
    rows = {}
    for mode in ("full", f"pio-{budget}"):
        if mode != "full":
            pio_fvlm.wrap(model, budget=budget)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            prefill = median_ms(lambda: model(**batch), reps=5)
        generate = median_ms(lambda: greedy(model, batch, new_tokens), reps=3)
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        rows[mode] = {"prefill_ms": round(prefill, 2), "generate_ms": round(generate, 1), "peak_mib": peak}
    pio_fvlm.unwrap(model)
    full, pio = rows["full"], rows[f"pio-{budget}"]
    rows["speedup"] = {"prefill": round(full["prefill_ms"] / pio["prefill_ms"], 3),
                       "generate": round(full["generate_ms"] / pio["generate_ms"], 3)}
    return rows


def sdpa_flash_only(model: nn.Module, budget: int, new_tokens: int, small: bool) -> dict[str, Any]:
    """Wrapped generate with SDPA restricted to its FlashAttention kernel (CUDA, half precision)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    one = prompts_batch(model, [(1, 24)], small)
    pio_fvlm.wrap(model, budget=budget)
    default = greedy(model, one, new_tokens)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = greedy(model, one, new_tokens)
        out: dict[str, Any] = {"ran": True, "tokens_equal_default_sdpa": int((flash == default).sum()),
                               "of_tokens": new_tokens}
    except RuntimeError as error:  # e.g. an explicit mask the flash kernel cannot take
        out = {"ran": False, "error": str(error).splitlines()[0][:300]}
    pio_fvlm.unwrap(model)
    return out


# (shape, batch, capture): the GPU speed table
TABLE = [("llava-1.5-7b", 1, False), ("llava-1.5-7b", 1, True), ("llava-1.5-7b", 8, False),
         ("llava-next-7b", 1, False), ("qwen2.5-vl-7b-video", 1, False)]
# the CPU miniature of each shape (--small: a smoke test of the table on any machine)
SMALL_SHAPES = {"llava-1.5-7b": "miniature", "llava-next-7b": "llava-next", "qwen2.5-vl-7b-video": "qwen2.5-vl-video"}


def table_row(shape: str, batch: int, capture: bool, attn: str, dtype: str, device: str, small: bool,
              reps: int) -> dict[str, Any]:
    """One row of the speed table: ``pio-fvlm bench`` on ``shape`` at its 11.1 % budget."""
    import gc

    from pio_fvlm import bench

    argv = ["--shapes", SMALL_SHAPES[shape] if small else shape, "--batch", str(batch), "--dtype", dtype,
            "--attn", attn, "--device", device, "--reps", str(reps), "--e2e-reps", "0", "--naive-budgets",
            "--budgets", str(round(0.111 * {"llava-1.5-7b": 576, "llava-next-7b": 2928,
                                             "qwen2.5-vl-7b-video": 4096}[shape]))]
    if small:
        argv += ["--num-layers", "2", "--text-tokens", "20"]
    if capture:
        argv.append("--capture")
    result = bench.run(bench.parser().parse_args(argv))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rows = {r["kind"]: r for r in result["rows"] if r["budget"] != result["n_visual"]}
    b = rows["pio"]["budget"]
    return {
        "shape": shape, "batch": batch, "capture": capture, "attn": attn, "visual": result["n_visual"], "budget": b,
        **{f"{k}_prefill_ms": round(rows[k]["prefill_ms"], 2) for k in ("full", "pio", "free", "ideal")},
        "pio_speedup": round(rows["pio"]["prefill_speedup"], 3),
        "ideal_speedup": round(rows["ideal"]["prefill_speedup"], 3),
        "pio_over_free_paired": round(result["checks"][f"pio{b}_over_free{b}_paired"], 3),
        "pio_over_free_by_selection": round(result["checks"][f"pio{b}_over_free{b}_by_selection"], 3),
        "select_ms": round(rows["pio"]["select_ms"], 2),
        "extra_kernel_ops": result["checks"][f"pio{b}_extra_kernel_ops"],
        "extra_host_syncs": result["checks"][f"pio{b}_extra_host_syncs"],
        "full_peak_mib": rows["full"]["peak_mb"], "pio_peak_mib": rows["pio"]["peak_mb"],
        "selection_peak_mib": rows["pio"]["selection_peak_mb"],
    }


def table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row of :data:`TABLE` (and flash-attn rows when the package imports), printed as measured."""
    import importlib.util

    plan = [(shape, batch, capture, "sdpa") for shape, batch, capture in TABLE]
    if importlib.util.find_spec("flash_attn") is not None and not args.small:
        plan += [("llava-1.5-7b", 1, False, "flash_attention_2"), ("llava-1.5-7b", 8, False, "flash_attention_2")]
    rows = []
    for shape, batch, capture, attn in plan:
        row = table_row(shape, batch, capture, attn, args.dtype, args.device, args.small, args.reps)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llava-1.5-7b", "qwen2.5-vl-7b"],
                   choices=["llava-1.5-7b", "qwen2.5-vl-7b"])
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke test of this script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-timing", action="store_true", help="correctness numbers only (e.g. a float32 run)")
    p.add_argument("--table", action="store_true", help="the speed table (see above) instead of the checks")
    p.add_argument("--reps", type=int, default=5, help="--table: prefill repetitions per mode")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.table:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = table(args)
        (out / f"gpu-table-{args.dtype}.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows},
                                                                      indent=1))
        return
    budget = 8 if args.small else args.budget
    import transformers

    report: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
                              "dtype": args.dtype, "budget": budget, "new_tokens": args.new_tokens, "models": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        seconds, model = timed(lambda name=name: build(name, args.small, dtype, args.device))
        entry: dict[str, Any] = {"build_s": round(seconds, 1)}
        report["models"][name] = entry
        for attn in ("sdpa", "eager"):
            model.set_attn_implementation(attn)
            entry[attn] = correctness(model, name, budget, args.new_tokens, args.small)
            print(name, attn, json.dumps({k: v for k, v in entry[attn].items() if k != "kept_one"}), flush=True)
        entry["backend_kept_overlap"] = len(set(entry["sdpa"]["kept_one"]) & set(entry["eager"]["kept_one"]))
        model.set_attn_implementation("sdpa")
        if args.device == "cuda" and dtype != torch.float32:
            entry["sdpa_flash_only"] = sdpa_flash_only(model, budget, args.new_tokens, args.small)
            print(name, "sdpa flash only", entry["sdpa_flash_only"], flush=True)
        if not args.no_timing:
            entry["timing"] = {f"batch{b}": timing(model, budget, b, args.new_tokens, args.small)
                               for b in (1, args.batch)}
            print(name, "timing", json.dumps(entry["timing"]), flush=True)
        (out / f"gpu-check-{args.dtype}.json").write_text(json.dumps(report, indent=1))
        del model
        synchronize()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
