"""Speed benchmark: full vs PIO-FVLM vs the ideal bound vs the authors' style, in one run.

    python benchmarks/speed.py            # or: pio-fvlm bench
    python benchmarks/speed.py --batch 8 --reps 5 --out results/

Modes, measured interleaved (round-robin over repetitions, so that machine noise hits all alike):

* ``full``: the unmodified model.
* ``pio-B``: wrapped with ``budget=B`` (the default selector).
* ``ideal-B``: the vision tower, then the language model fed only text + B visual tokens from
  layer 0: the limit for any in-LLM pruning with free selection.
* ``naive-B``: the authors' implementation style (full-sequence probe and head, host NMS loop).
* ``free-B``: pruning at the same layer with a selection that costs nothing (evenly spaced
  tokens): the bound for any method that must score tokens after layer 1.

The default model is a random-weight LLaVA-1.5 miniature: CLIP at 336 px / patch 14 (576 visual
tokens), a 32-layer LM with LLaVA-7B's proportions shrunk (hidden 512, MLP 1376, vocabulary 4000,
so that head / layer cost matches 7B), about 50 text tokens. ``--model`` takes a real checkpoint.
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
from .measure import TimedSelector, count_flops, count_launches, kv_cache_bytes, synchronize, timed
from .select import PioSelector
from .select.baselines import UniformSelector
from .select.naive import NaiveSelector


def miniature_llava(attn: str = "sdpa", dtype: torch.dtype = torch.float32, num_layers: int = 32) -> nn.Module:
    """LLaVA-1.5-7B's shape, shrunk 8x in width (see module docstring)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=128)
    text = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=num_layers, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=4000, pad_token_id=0, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=3, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config).eval().to(dtype)


def random_llava15_7b(attn: str, dtype: torch.dtype, device: str, num_layers: int = 32) -> nn.Module:
    """LLaVA-1.5-7B's real shapes (CLIP-L/336, 32 x 4096 Vicuna) with random weights, built
    directly on ``device`` in ``dtype`` (about 14 GB in bf16): the GPU check without a download."""
    from transformers import LlavaForConditionalGeneration

    from .testing import build_on_device, llava15_7b_config

    torch.manual_seed(0)
    config = llava15_7b_config(text_layers=num_layers)
    config._attn_implementation = attn
    return build_on_device(LlavaForConditionalGeneration, config, dtype, device)


def miniature_inputs(model: nn.Module, batch: int, text_tokens: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n_img = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    before = torch.randint(10, 3900, (batch, 5), generator=g)
    after = torch.randint(10, 3900, (batch, text_tokens - 5), generator=g)
    ids = torch.cat([before, torch.full((batch, n_img), model.config.image_token_id), after], dim=1)
    side = model.config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, side, side, generator=g).to(model.dtype),
    }


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
    peak_bytes: int | None = None


class Bench:
    """Runs each mode's prefill and generate on one model and one batch."""

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int) -> None:
        self.model = model
        self.inputs = {k: v.to(model.device) for k, v in inputs.items()}
        self.new_tokens = new_tokens
        self.timer = TimedSelector(PioSelector())
        self.image_token = int(model.config.image_token_id)

    def _configure(self, mode: Mode) -> None:
        if is_wrapped(self.model):
            unwrap(self.model)
        if mode.kind in ("pio", "naive", "free"):
            inner = {
                "pio": self.timer,
                "naive": TimedSelector(NaiveSelector()),
                "free": TimedSelector(UniformSelector()),
            }
            self.timer_now = inner[mode.kind]
            wrap(self.model, budget=mode.budget, selector=self.timer_now)

    def _ideal_embeds(self, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision tower + projector, then embeddings of text + the first ``budget`` visual tokens."""
        m, ids = self.model, self.inputs["input_ids"]
        cfg = m.config
        feats = m.model.get_image_features(
            pixel_values=self.inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output
        visual = ids == self.image_token
        keep = visual & (visual.long().cumsum(1) <= budget)
        short_ids = ids[~visual | keep].view(ids.shape[0], -1)
        embeds = m.get_input_embeddings()(short_ids)
        short_visual = short_ids == self.image_token
        kept = torch.stack([f[:budget] for f in feats]).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter(short_visual.unsqueeze(-1), kept.to(embeds.dtype))
        return embeds, torch.ones_like(short_ids)

    def prefill(self, mode: Mode) -> Any:
        if mode.kind == "ideal":
            assert mode.budget is not None
            embeds, mask = self._ideal_embeds(mode.budget)
            return self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def generate(self, mode: Mode) -> Any:
        kw = dict(max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=False)
        if mode.kind == "ideal":
            assert mode.budget is not None
            embeds, mask = self._ideal_embeds(mode.budget)
            return self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
        return self.model.generate(**self.inputs, **kw)

    def measure(self, mode: Mode, e2e: bool) -> None:
        self._configure(mode)
        with torch.inference_mode():
            if mode.kind in ("pio", "naive", "free"):
                self.timer_now.seconds = 0.0
            seconds, _ = timed(lambda: self.prefill(mode))
            mode.prefill_s.append(seconds)
            if mode.kind in ("pio", "naive", "free"):
                mode.select_s.append(self.timer_now.seconds)
            if e2e:
                seconds, _ = timed(lambda: self.generate(mode))
                mode.e2e_s.append(seconds)

    def static_metrics(self, mode: Mode) -> None:
        self._configure(mode)
        with torch.inference_mode():
            out = self.prefill(mode)
            mode.kv_bytes, mode.kv_layer_bytes = kv_cache_bytes(out.past_key_values)
        with torch.no_grad():  # dispatch modes see no operator under inference_mode
            mode.flops = count_flops(lambda: self.prefill(mode))
            mode.kernel_ops, mode.host_syncs = count_launches(lambda: self.prefill(mode))
        with torch.inference_mode():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                self.prefill(mode)
                synchronize()
                mode.peak_bytes = torch.cuda.max_memory_allocated()


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
    elif args.shapes == "llava-1.5-7b":
        model = random_llava15_7b(args.attn, dtype, args.device, args.num_layers or 32)
    else:
        model = miniature_llava(args.attn, dtype, args.num_layers or 32).to(args.device)
    inputs = miniature_inputs(model, args.batch, args.text_tokens)
    n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    bench = Bench(model, inputs, args.new_tokens)
    modes = [Mode("full", "full")]
    for b in args.budgets:
        modes += [Mode(f"pio-{b}", "pio", b), Mode(f"ideal-{b}", "ideal", b)]
    modes += [Mode(f"naive-{b}", "naive", b) for b in args.naive_budgets]
    # same prune point, a selection that costs nothing: the bound for pruning at layer 1
    modes += [Mode(f"free-{b}", "free", b) for b in args.naive_budgets]
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
    return summarize(modes, args, model, n_visual)


def summarize(modes: list[Mode], args: argparse.Namespace, model: nn.Module, n_visual: int) -> dict[str, Any]:
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
            "peak_mb": m.peak_bytes / 2**20 if m.peak_bytes else None,
        })
    by = {r["mode"]: r for r in rows}
    paired = {m.name: m for m in modes}

    def paired_ratio(a: str, b: str) -> float:
        """Median over repetitions of time(a) / time(b) measured in the same round (drift cancels)."""
        return statistics.median(x / y for x, y in zip(paired[a].prefill_s, paired[b].prefill_s))

    checks = {}
    if 64 in args.budgets:
        checks["pio64_over_ideal64"] = by["pio-64"]["prefill_speedup"] / by["ideal-64"]["prefill_speedup"]
        checks["pio64_over_ideal64_paired"] = paired_ratio("ideal-64", "pio-64")
        if "free-64" in by:
            checks["pio64_over_free64_paired"] = paired_ratio("free-64", "pio-64")
        checks["selection_overhead_of_full_prefill"] = by["pio-64"]["select_ms"] / (fp * 1e3)
        layer_bytes = by["pio-64"]["kv_layer_bytes"]
        full_bytes = full.kv_layer_bytes
        checks["pruned_layer_kv_ratio"] = layer_bytes[-1] / full_bytes[-1]
        total = args.text_tokens + n_visual
        checks["pruned_layer_kv_expected"] = (args.text_tokens + 64) / total
    for kind in ("pio", "free"):
        if f"{kind}-64" in by:
            checks[f"{kind}64_extra_kernel_ops"] = by[f"{kind}-64"]["kernel_ops"] - full.kernel_ops
            checks[f"{kind}64_extra_host_syncs"] = by[f"{kind}-64"]["host_syncs"] - full.host_syncs
    checks["noop_extra_kernel_ops"] = by[f"pio-{n_visual}"]["kernel_ops"] - full.kernel_ops
    checks["noop_prefill_ratio"] = by[f"pio-{n_visual}"]["prefill_ms"] / (fp * 1e3)
    checks["noop_prefill_ratio_paired"] = paired_ratio(f"pio-{n_visual}", "full")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "model": args.model or {"miniature": "miniature LLaVA-1.5 (hidden 512)",
                                "llava-1.5-7b": "LLaVA-1.5-7B shapes, random weights"}[args.shapes],
        "num_layers": model.config.text_config.num_hidden_layers,
        "dtype": args.dtype,
        "attn": args.attn,
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
            f"{'select ms':>9} {'KV MiB':>7} {'KVx':>5} {'GFLOP':>8} {'FLOPx':>6} {'ops':>6} {'syncs':>5}")
    lines = [f"device={result['device']} dtype={result['dtype']} attn={result['attn']} batch={result['batch']} "
             f"visual={result['n_visual']} text={result['text_tokens']} reps={result['reps']}", head]
    for r in result["rows"]:
        sel = f"{r['select_ms']:.1f}" if r["select_ms"] is not None else "-"
        lines.append(
            f"{r['mode']:<10} {r['prefill_ms']:>9.1f} ({r['prefill_ms_min']:.1f}-{r['prefill_ms_max']:.1f})"
            .ljust(35)
            + f" {r['prefill_speedup']:>6.2f} {r['e2e_ms']:>9.1f} {r['e2e_speedup']:>6.2f} {r['decode_tok_s']:>9.1f} "
            f"{sel:>9} {r['kv_bytes'] / 2**20:>7.2f} {r['kv_ratio']:>5.2f} {r['gflops']:>8.2f} {r['flops_ratio']:>6.2f}"
            f" {r['kernel_ops']:>6} {r['host_syncs']:>5}"
        )
    lines.append("ops: kernel-launching aten ops of one prefill (view-only ops left out); syncs: host reads")
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
    p.add_argument("--shapes", default="miniature", choices=["miniature", "llava-1.5-7b"],
                   help="random-weight model to build when --model is not given: the 32-layer CPU "
                        "miniature, or LLaVA-1.5-7B's real shapes (for a GPU: about 14 GB in bfloat16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64, 32])
    p.add_argument("--naive-budgets", type=int, nargs="*", default=[64])
    p.add_argument("--reps", type=int, default=7, help="prefill repetitions per mode")
    p.add_argument("--e2e-reps", type=int, default=3, help="generate repetitions per mode")
    p.add_argument("--num-layers", type=int, default=None, help="built-in shapes only: LM depth (default 32)")
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
    stem = args.tag or f"speed-{'gpu' if result['device'] != 'cpu' else 'cpu'}-b{args.batch}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    try:
        plot(result, out / f"{stem}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'pio-fvlm[bench]')")
    print(f"wrote {out / stem}.json and .png")
    return result


if __name__ == "__main__":
    main()
