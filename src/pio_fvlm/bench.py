"""Speed benchmark: full vs PIO-FVLM vs the ideal bound vs the authors' style, in one run.

    python benchmarks/speed.py            # or: pio-fvlm bench
    python benchmarks/speed.py --batch 8 --reps 5 --out results/

Modes, measured interleaved (round-robin over repetitions, so that machine noise hits all alike):

* ``full``: the unmodified model.
* ``pio-B``: wrapped with ``budget=B`` (the default selector).
* ``ideal-B``: the vision tower, then the language model on text + B visual tokens from layer 0
  (pruning before layer 0 with a selection that costs nothing): the limit for any in-LLM pruning.
* ``naive-B``: the authors' implementation style (full-sequence probe and head, host NMS loop).
* ``free-B``: pruning at the same layer with a selection that costs nothing (evenly spaced
  tokens): the bound for any method that must score tokens after layer 1.

The default model is a random-weight LLaVA-1.5 miniature: CLIP at 336 px / patch 14 (576 visual
tokens), a 32-layer LM with LLaVA-7B's proportions shrunk (hidden 512, MLP 1376, vocabulary 4000,
so that head / layer cost matches 7B), about 50 text tokens. ``--shapes`` picks the high-resolution
and video shapes (2,304 to 4,096 visual tokens; see :mod:`pio_fvlm.bench_models`) or the real 7B
shapes for a GPU; ``--model`` takes a real checkpoint.

Per mode it reports prefill and ``generate`` latency, selection time, KV-cache bytes, FLOPs, the
kernel-launching ops and host reads of one prefill, and its transient memory peak (bytes held
at once by what the prefill allocates; the selection's own peak for pruning modes).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import unwrap, wrap
from .api import is_wrapped
from .bench_models import (
    SHAPE_OF_MODEL_TYPE,
    SHAPES,
    miniature_llava,
    random_llava15_7b,
    shape_inputs,
)
from .compat import output_cache
from .measure import OpStats, TimedSelector, kv_cache_bytes, pre_hook_seconds, synchronize, timed
from .models import adapter_for, visual_token_counts
from .select import PioSelector
from .select.baselines import UniformSelector
from .select.naive import NaiveSelector

__all__ = ["Bench", "main", "miniature_llava", "random_llava15_7b", "run"]


@dataclass
class Mode:
    name: str
    kind: str  # full | pio | ideal | naive
    budget: int | None = None
    prefill_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    select_s: list[float] = field(default_factory=list)
    kv_bytes: int = 0
    kv_layer_bytes: list[int] = field(default_factory=list)
    flops: int = 0
    kernel_ops: int = 0
    host_syncs: int = 0
    transient_peak_bytes: int = 0
    selection_peak_bytes: int | None = None
    hook_us_later_layers: float | None = None
    peak_bytes: int | None = None


class Bench:
    """Runs each mode's prefill and generate on one model and one batch."""

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int,
                 capture: bool = False) -> None:
        self.model = model
        self.inputs = {k: v.to(model.device) for k, v in inputs.items()}
        self.new_tokens = new_tokens
        self.capture = capture
        self.timer = TimedSelector(PioSelector())

    def _configure(self, mode: Mode) -> None:
        if is_wrapped(self.model):
            unwrap(self.model)
        self.timer_now: TimedSelector | None = None
        if mode.kind in ("pio", "naive", "free"):
            inner = {
                "pio": self.timer,
                "naive": TimedSelector(NaiveSelector()),
                "free": TimedSelector(UniformSelector()),
            }
            self.timer_now = inner[mode.kind]
            wrap(self.model, budget=mode.budget, selector=self.timer_now, capture=self.capture and mode.kind == "pio")
        elif mode.kind == "ideal":
            assert mode.budget is not None
            prune_before_layer_0(self.model, mode.budget)

    def prefill(self, mode: Mode) -> Any:
        return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def generate(self, mode: Mode) -> Any:
        kw = dict(max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=False)
        return self.model.generate(**self.inputs, **kw)

    def measure(self, mode: Mode, e2e: bool) -> None:
        self._configure(mode)
        with torch.inference_mode():
            if self.timer_now is not None:
                self.timer_now.seconds = 0.0
            seconds, _ = timed(lambda: self.prefill(mode))
            mode.prefill_s.append(seconds)
            if self.timer_now is not None:
                mode.select_s.append(self.timer_now.seconds)
            if e2e:
                seconds, _ = timed(lambda: self.generate(mode))
                mode.e2e_s.append(seconds)

    def static_metrics(self, mode: Mode) -> None:
        self._configure(mode)
        with torch.inference_mode():
            out = self.prefill(mode)
            cache = output_cache(out)
            mode.kv_bytes, mode.kv_layer_bytes = kv_cache_bytes(cache)
            del out
        with torch.no_grad(), OpStats() as stats:  # dispatch modes see no operator under inference_mode
            if self.timer_now is not None:
                self.timer_now.stats = stats
            try:
                self.prefill(mode)
            finally:
                if self.timer_now is not None:
                    self.timer_now.stats = None
        mode.flops, mode.kernel_ops, mode.host_syncs = stats.flops, stats.kernels, stats.syncs
        mode.transient_peak_bytes = stats.peak_bytes
        mode.selection_peak_bytes = stats.window_peak_bytes if self.timer_now is not None else None
        if mode.kind in ("full", "pio"):
            # host time in the pre-hooks of layers 2.. (pruned layers after the one that selects);
            # on `full` it is the measurement's own floor (no pio_fvlm hook there). Best of 3.
            layers = adapter_for(self.model).find_parts(self.model).layers
            medians = []
            with torch.inference_mode():
                for _ in range(3):
                    spent = pre_hook_seconds(layers, lambda: self.prefill(mode))
                    later = [spent[i] for i in range(2, len(layers)) if i in spent]
                    if later:
                        medians.append(statistics.median(later))
            mode.hook_us_later_layers = min(medians) * 1e6 if medians else None
        with torch.inference_mode():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                self.prefill(mode)
                synchronize()
                mode.peak_bytes = torch.cuda.max_memory_allocated()


def prune_before_layer_0(model: nn.Module, budget: int) -> None:
    """The ideal bound: keep ``budget`` evenly spaced visual tokens before decoder layer 0, so that
    every layer runs on text + ``budget`` tokens (undone by :func:`pio_fvlm.unwrap`)."""
    wrap(model, budget=budget, layer=0, selector=UniformSelector())


def ratio_by_selection(free_prefill_s: list[float], pio_select_s: list[float], free_select_s: list[float]
                       ) -> float:
    """PIO's speed over ``free``'s, from the one thing that differs between them: the selector.

    Both run the same runtime on sequences of the same length, so a PIO prefill is a ``free``
    prefill plus the extra time of its selector call, which is timed on its own (a few percent
    of the prefill). Per round: ``free / (free + select_pio - select_free)``; the median over
    rounds. Unlike the paired ratio of two whole prefills, the pruned layers' run-to-run noise
    does not enter it.
    """
    return statistics.median(
        f / (f + sp - sf) for f, sp, sf in zip(free_prefill_s, pio_select_s, free_select_s, strict=True))


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args: argparse.Namespace, progress: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    if args.model:
        if args.num_layers:
            raise SystemExit("--num-layers only applies to the built-in shapes (--shapes), not to --model")
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn,
                                                            device_map=args.device)
        shape = SHAPES[args.shapes or SHAPE_OF_MODEL_TYPE.get(model.config.model_type, "miniature")]
    else:
        shape = SHAPES[args.shapes or "miniature"]
        model = shape.build(args.attn, dtype, args.device, args.num_layers)
    inputs = shape_inputs(model, shape, args.batch, args.text_tokens)
    n_visual = visual_token_counts(model, inputs["input_ids"][:1])[0]
    budgets, naive_budgets, free_budgets = mode_budgets(args, n_visual)
    bench = Bench(model, inputs, args.new_tokens, capture=args.capture)
    modes = [Mode("full", "full")]
    for b in budgets:
        modes += [Mode(f"pio-{b}", "pio", b), Mode(f"ideal-{b}", "ideal", b)]
    modes += [Mode(f"naive-{b}", "naive", b) for b in naive_budgets]
    # same prune point, a selection that costs nothing: the bound for pruning at layer 1
    modes += [Mode(f"free-{b}", "free", b) for b in free_budgets]
    modes.append(Mode(f"pio-{n_visual}", "pio", n_visual))  # the no-op path

    for mode in modes:
        bench.static_metrics(mode)
    with torch.inference_mode():  # warm-up
        for mode in modes:
            bench.measure(mode, e2e=False)
            mode.prefill_s.clear()
            mode.select_s.clear()
    reps = range(args.reps)
    for rep in progress(reps) if progress else reps:
        for mode in modes:
            bench.measure(mode, e2e=rep < args.e2e_reps)
    if is_wrapped(model):
        unwrap(model)
    return summarize(modes, args, model, n_visual, budgets[0], inputs["input_ids"].shape[1])


def mode_budgets(args: argparse.Namespace, n_visual: int) -> tuple[list[int], list[int], list[int]]:
    """Budgets of the pio / ideal modes, of the naive modes and of the free modes.

    Defaults: on the LLaVA-1.5 miniature 192, 128, 64, 32 (naive and free at 64); on every other
    shape ``--budget-fraction`` (11.1 %) of its visual tokens, with free at the same budget.
    """
    miniature = (args.shapes or "miniature") == "miniature" and not args.model
    fraction = max(1, round(args.budget_fraction * n_visual))
    budgets = args.budgets or ([192, 128, 64, 32] if miniature else [fraction])
    naive = args.naive_budgets if args.naive_budgets is not None else ([64] if miniature else [])
    free = naive if miniature and args.budgets is None else [budgets[0]]
    return budgets, naive, sorted(set(free) | set(naive), reverse=True)


def summarize(modes: list[Mode], args: argparse.Namespace, model: nn.Module, n_visual: int, budget: int,
              seq_len: int) -> dict[str, Any]:
    full = modes[0]
    fp, fe = _median(full.prefill_s), _median(full.e2e_s)
    rows = []
    for m in modes:
        p, e = _median(m.prefill_s), _median(m.e2e_s)
        rows.append({
            "mode": m.name,
            "kind": m.kind,
            "budget": m.budget,
            "prefill_ms": p * 1e3,
            "prefill_ms_min": min(m.prefill_s) * 1e3,
            "prefill_ms_max": max(m.prefill_s) * 1e3,
            "prefill_speedup": fp / p,
            "e2e_ms": e * 1e3,
            "e2e_speedup": fe / e,
            "decode_tok_s": args.new_tokens * args.batch / (e - p) if e == e else float("nan"),
            "select_ms": _median(m.select_s) * 1e3 if m.select_s else None,
            "kv_bytes": m.kv_bytes,
            "kv_ratio": full.kv_bytes / m.kv_bytes,
            "kv_layer_bytes": m.kv_layer_bytes,
            "gflops": m.flops / 1e9,
            "flops_ratio": full.flops / m.flops if m.flops else float("nan"),
            "kernel_ops": m.kernel_ops,
            "host_syncs": m.host_syncs,
            "transient_peak_mb": m.transient_peak_bytes / 2**20,
            "selection_peak_mb": m.selection_peak_bytes / 2**20 if m.selection_peak_bytes is not None else None,
            "hook_us_later_layers": m.hook_us_later_layers,
            "peak_mb": m.peak_bytes / 2**20 if m.peak_bytes else None,
        })
    by = {r["mode"]: r for r in rows}
    paired = {m.name: m for m in modes}

    def paired_ratio(a: str, b: str) -> float:
        """Median over repetitions of time(a) / time(b) measured in the same round (drift cancels)."""
        return statistics.median(x / y for x, y in zip(paired[a].prefill_s, paired[b].prefill_s))

    b = budget
    checks: dict[str, Any] = {}
    checks[f"pio{b}_over_ideal{b}"] = by[f"pio-{b}"]["prefill_speedup"] / by[f"ideal-{b}"]["prefill_speedup"]
    checks[f"pio{b}_over_ideal{b}_paired"] = paired_ratio(f"ideal-{b}", f"pio-{b}")
    if f"free-{b}" in by:
        checks[f"pio{b}_over_free{b}_paired"] = paired_ratio(f"free-{b}", f"pio-{b}")
        free_mode, pio_mode = paired[f"free-{b}"], paired[f"pio-{b}"]
        checks[f"pio{b}_over_free{b}_by_selection"] = ratio_by_selection(
            free_mode.prefill_s, pio_mode.select_s, free_mode.select_s)
    checks["selection_overhead_of_full_prefill"] = by[f"pio-{b}"]["select_ms"] / (fp * 1e3)
    checks["pruned_layer_kv_ratio"] = by[f"pio-{b}"]["kv_layer_bytes"][-1] / full.kv_layer_bytes[-1]
    text = seq_len - n_visual  # text tokens (and markers around the visual run)
    checks["pruned_layer_kv_expected"] = (text + b) / seq_len
    selection_peak = by[f"pio-{b}"]["selection_peak_mb"]
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    checks["selection_peak_of_full_peak"] = selection_peak / by["full"]["transient_peak_mb"]
    checks["selection_peak_of_full_peak_with_weights"] = selection_peak / (by["full"]["transient_peak_mb"] + weights_mb)
    for kind in ("pio", "free"):
        if f"{kind}-{b}" in by:
            checks[f"{kind}{b}_extra_kernel_ops"] = by[f"{kind}-{b}"]["kernel_ops"] - full.kernel_ops
            checks[f"{kind}{b}_extra_host_syncs"] = by[f"{kind}-{b}"]["host_syncs"] - full.host_syncs
    hook_us, floor_us = by[f"pio-{b}"]["hook_us_later_layers"], by["full"]["hook_us_later_layers"]
    checks[f"pio{b}_hook_us_per_later_layer"] = hook_us - floor_us if hook_us is not None else None
    checks["noop_extra_kernel_ops"] = by[f"pio-{n_visual}"]["kernel_ops"] - full.kernel_ops
    checks["noop_prefill_ratio"] = by[f"pio-{n_visual}"]["prefill_ms"] / (fp * 1e3)
    checks["noop_prefill_ratio_paired"] = paired_ratio(f"pio-{n_visual}", "full")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "model": args.model or args.shapes or "miniature",
        "num_layers": model.config.text_config.num_hidden_layers,
        "hidden_size": model.config.text_config.hidden_size,
        "weights_mb": weights_mb,
        "dtype": args.dtype,
        "attn": args.attn,
        "capture": args.capture,
        "batch": args.batch,
        "n_visual": n_visual,
        "text_tokens": args.text_tokens,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "rows": rows,
        "checks": checks,
    }


def format_table(result: dict[str, Any]) -> str:
    head = (f"{'mode':<10} {'prefill ms (min-max)':>24} {'x':>6} {'e2e ms':>9} {'x':>6} {'dec tok/s':>9} "
            f"{'select ms':>9} {'KV MiB':>7} {'KVx':>5} {'GFLOP':>8} {'FLOPx':>6} {'ops':>6} {'syncs':>5} "
            f"{'peak MiB':>8} {'sel MiB':>7}")
    lines = [f"{result['model']}: device={result['device']} dtype={result['dtype']} attn={result['attn']} "
             f"batch={result['batch']} visual={result['n_visual']} text={result['text_tokens']} "
             f"reps={result['reps']}", head]
    for r in result["rows"]:
        sel = f"{r['select_ms']:.1f}" if r["select_ms"] is not None else "-"
        lines.append(
            f"{r['mode']:<10} {r['prefill_ms']:>9.1f} ({r['prefill_ms_min']:.1f}-{r['prefill_ms_max']:.1f})"
            .ljust(35)
            + f" {r['prefill_speedup']:>6.2f} {r['e2e_ms']:>9.1f} {r['e2e_speedup']:>6.2f} {r['decode_tok_s']:>9.1f} "
            f"{sel:>9} {r['kv_bytes'] / 2**20:>7.2f} {r['kv_ratio']:>5.2f} {r['gflops']:>8.2f} {r['flops_ratio']:>6.2f}"
            f" {r['kernel_ops']:>6} {r['host_syncs']:>5} {r['transient_peak_mb']:>8.1f} "
            + (f"{r['selection_peak_mb']:>7.1f}" if r["selection_peak_mb"] is not None else f"{'-':>7}")
        )
    lines.append("ops: kernel-launching aten ops of one prefill (view-only ops left out); syncs: host reads; "
                 "peak: bytes the prefill allocates and holds at once; sel: the selection's own peak")
    lines.append("checks: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in result["checks"].items()))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("pio", "o-"), ("ideal", "s--"), ("naive", "x")):
        pts = sorted(
            (r["budget"], r["prefill_speedup"])
            for r in rows
            if r["kind"] == kind and r["budget"] < result["n_visual"]
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=kind)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel(f"visual tokens kept (of {result['n_visual']})")
    ax.set_ylabel("prefill speedup vs full")
    where = f"{result['device']}, {result['dtype']}, {result['attn']}, batch {result['batch']}"
    ax.set_title(f"{result['model']}\n{where}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF id or path of a real checkpoint (default: built-in random weights, --shapes)")
    p.add_argument("--shapes", default=None, choices=list(SHAPES),
                   help="random-weight model and input to build when --model is not given (default miniature: "
                        "LLaVA-1.5, 576 visual tokens): CPU miniatures llava-672 (2,304), llava-next (2,928), "
                        "qwen2.5-vl-1344 (2,304), qwen2.5-vl-video (4,096), or the real 7B shapes for a GPU "
                        "(llava-1.5-7b, llava-next-7b, qwen2.5-vl-7b, qwen2.5-vl-7b-video); with --model, the "
                        "input to give it (default: by its model type)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"],
                   help="attention implementation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    p.add_argument("--batch", type=int, default=1, help="identical rows per batch")
    p.add_argument("--text-tokens", type=int, default=50, help="text tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generate() makes in the end-to-end timing")
    p.add_argument("--budgets", type=int, nargs="+", default=None,
                   help="visual tokens kept (default: 192 128 64 32 on the miniature, else --budget-fraction)")
    p.add_argument("--budget-fraction", type=float, default=0.111,
                   help="the default budget as a fraction of the visual tokens on shapes other than the miniature")
    p.add_argument("--naive-budgets", type=int, nargs="*", default=None,
                   help="budgets of the authors'-style mode (default: 64 on the miniature, none elsewhere)")
    p.add_argument("--capture", action="store_true",
                   help="pio modes run the probe as a compiled graph (wrap(..., capture=True); for a GPU)")
    p.add_argument("--reps", type=int, default=7, help="prefill repetitions per mode")
    p.add_argument("--e2e-reps", type=int, default=3, help="generate repetitions per mode")
    p.add_argument("--num-layers", type=int, default=None, help="built-in shapes only: LM depth (default: the shape's)")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON and PNG")
    p.add_argument("--tag", default=None, help="file name stem (default: speed-<device>-b<batch>)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    try:
        from tqdm import tqdm

        progress: Callable[[Any], Any] | None = lambda it: tqdm(it, desc="repetitions")  # noqa: E731
    except ImportError:
        progress = None
    with torch.no_grad():  # scoped: `pio-fvlm bench` may run inside a caller's process (tests, notebooks)
        result = run(args, progress)
    print(format_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = "" if (args.shapes or "miniature") == "miniature" else f"-{args.shapes}"
    stem = args.tag or f"speed-{'gpu' if result['device'] != 'cpu' else 'cpu'}{shape}-b{args.batch}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    try:
        plot(result, out / f"{stem}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'pio-fvlm[bench]')")
    print(f"wrote {out / stem}.json and .png")
    return result


if __name__ == "__main__":
    main()
