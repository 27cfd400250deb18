"""Quality benchmark on the shipped tiny LLaVA (synthetic shapes task, held-out split).

    python benchmarks/quality.py                       # budgets 192 128 64 32 16, every selector
    python benchmarks/quality.py --items 150 --budgets 64 16

Accuracy and retention (= accuracy / accuracy with all 576 tokens) per budget for: PIO-FVLM
(default, and the variants worth knowing: prune layer 2, proxy positions including the last,
NMS off, tau 0.6), the encoder-involved mode (VisionZip-style alone and followed by PIO),
and baselines through the same selector interface: random, uniform, pooling,
FastV (the last token's attention at layer 2, FastV's own setting, and at layer 1, PIO's prune
layer; computed from the layer's projections, so any backend works) and DART-style.
Blank-image accuracy gives the answer prior; "one visual token left from layer L on" gives what
the text has already read from the image in the layers before L (every selector at layer L
starts from there). Beside accuracy, for each selector: the share of questions whose objects all
keep a token, and the share of those objects' tokens kept (does it find what is asked about?).
Writes JSON to benchmarks/results/quality.json. The split is held out (its own seed) and nothing
is tuned on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

import pio_fvlm
from pio_fvlm import shapes_vlm as sv
from pio_fvlm import synthetic as syn
from pio_fvlm.select.baselines import (
    DartSelector,
    FastVSelector,
    PoolingSelector,
    RandomSelector,
    UniformSelector,
    top_by_visual_score,
)

SHIPPED_TRAINING_STATE = Path(__file__).resolve().parents[1] / "training/records/recipe-12-shipped/training_state.json"


class OracleSelector:
    """Not a method: a diagnostic that knows the answer's location. It keeps the tokens of the
    objects the question is about first, then the other objects' tokens, then background in
    raster order. Each prefill call takes the next rows of ``queue`` (per item: a (576,) score,
    2 / 1 / 0), so it only works on :func:`evaluate`'s batches in order."""

    def __init__(self) -> None:
        self.queue: list[np.ndarray] = []

    def load(self, items: list[tuple[sv.EvalItem, Any]]) -> None:
        self.queue = []
        for (_, objects, qa), owners in items:
            targets = syn.question_objects(qa, objects)
            self.queue.append(np.where(np.isin(owners, targets), 2.0, np.where(owners >= 0, 1.0, 0.0)))

    def __call__(self, request: Any) -> torch.Tensor:
        n = request.candidates.shape[0]
        rows, self.queue = self.queue[:n], self.queue[n:]
        # raster order breaks ties: a tiny decreasing offset
        return top_by_visual_score(request, [torch.from_numpy(r).float() - torch.arange(len(r)) * 1e-6 for r in rows])


ORACLE = OracleSelector()


VARIANTS: dict[str, dict[str, Any]] = {
    "pio": {},
    "pio layer=2": {"layer": 2},
    "pio proxy incl. last": {"proxy_includes_last": True},
    "pio no NMS": {"nms_threshold": None},
    "pio tau=0.6": {"nms_threshold": 0.6},
    "random": {"selector": RandomSelector(0)},
    "uniform": {"selector": UniformSelector()},
    "pooling": {"selector": PoolingSelector(sv.N_VISUAL)},
    "fastv (layer 2)": {"selector": FastVSelector(), "layer": 2},
    "fastv (layer 1)": {"selector": FastVSelector(), "layer": 1},
    "dart": {"selector": DartSelector()},
    # encoder-involved mode: VisionZip-style reduction before the LM (alone: to the budget; with
    # PIO: to twice the budget, then PIO-FVLM at layer 1 to the budget)
    "visionzip (encoder only)": {"encoder": "visionzip", "encoder_budget": 1},
    "visionzip + pio": {"encoder": "visionzip", "encoder_budget": 2},
    # not a method: keeps the asked-about objects' tokens first (see OracleSelector)
    "oracle (layer 1)": {"selector": ORACLE},
}



LABELS = {
    "pio": "pio (layer 1, authors' defaults)",
    "pio layer=2": "pio, layer 2",
    "pio proxy incl. last": "pio, proxy positions incl. last",
    "pio no NMS": "pio, no NMS",
    "pio tau=0.6": "pio, tau 0.6",
    "fastv (layer 2)": "FastV (layer 2, its own setting)",
    "fastv (layer 1)": "FastV at layer 1 (PIO's prune layer)",
    "dart": "DART-style",
    "visionzip (encoder only)": "encoder only (VisionZip-style, to the budget)",
    "visionzip + pio": "encoder to 2x budget + pio",
}


def answer_prior(split: list[sv.EvalItem]) -> float:
    """Accuracy of the best constant answer per question type (counted on ``split`` itself, so
    an upper bound on what a model that ignores the image can score)."""
    by_kind: dict[str, list[str]] = {}
    for _, _, qa in split:
        by_kind.setdefault(qa.kind, []).append(qa.answer)
    return sum(max(answers.count(a) for a in set(answers)) for answers in by_kind.values()) / len(split)


def markdown_table(result: dict[str, Any]) -> str:
    """The README / docs table of a result: retention per budget, and the coverage columns at
    budgets 64 and 16 (or the largest and smallest measured)."""
    result = json.loads(json.dumps(result))  # budgets as strings, as in a saved result
    full = result["full"]["all"]
    budgets = [int(b) for b in next(iter(result["accuracy"].values()))]
    a, b = (64, 16) if {64, 16} <= set(budgets) else (max(budgets), min(budgets))
    lines = ["| selector | " + " | ".join(map(str, budgets))
             + f" | asked-about objects kept, {a} / {b} | their tokens kept, {a} / {b} |",
             "|---" * (len(budgets) + 3) + "|"]
    for name, accuracy in result["accuracy"].items():
        seen, share = result["questions_with_every_object_kept"][name], result["share_of_object_tokens_kept"][name]
        cells = [f"{accuracy[str(k)] / full:.1%}".replace("%", " %") for k in budgets]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells)
                     + f" | {seen[str(a)]:.0%} / {seen[str(b)]:.0%} | {share[str(a)]:.0%} / {share[str(b)]:.0%} |"
                     .replace("%", " %"))
    return "\n".join(lines)


def settings(name: str, budget: int) -> dict[str, Any]:
    """The wrap() keywords of a variant at a budget (encoder budgets scale with it)."""
    kw = dict(VARIANTS[name])
    if "encoder_budget" in kw:
        kw["encoder_budget"] = min(sv.N_VISUAL, kw["encoder_budget"] * budget)
    return kw


def accuracy_and_coverage(model: Any, items: list[tuple[sv.EvalItem, Any]]) -> tuple[float, float, float]:
    """Accuracy of the wrapped model; the share of questions whose objects all keep at least one
    visual token; and the share of those objects' tokens kept (the objects of a question: every
    object for counting, none for an absent one). Tokens that a merging selector folds into a
    kept one are not credited: only kept positions count."""
    split = [item for item, _ in items]
    covered: list[bool] = []
    token_share: list[float] = []

    def note(start: int, chunk: list[sv.EvalItem]) -> None:
        kept = pio_fvlm.last_selection(model)
        assert kept is not None
        rows = sv.prompt_rows([qa for _, _, qa in chunk])
        length = max(len(r) for r in rows)
        for offset, (row, positions) in enumerate(zip(rows, kept)):
            (_, objects, qa), owners = items[start + offset]
            targets = syn.question_objects(qa, objects)
            if targets:
                # left padding: the image's 576 tokens start at length - len(row)
                kept_owners = owners[positions.cpu().numpy() - (length - len(row))]
                covered.append(all(t in kept_owners for t in targets))
                token_share.append(np.isin(kept_owners, targets).sum() / np.isin(owners, targets).sum())

    accuracy = sv.evaluate(model, split, on_batch=note)["all"]
    return accuracy, float(np.mean(covered)), float(np.mean(token_share))


def load_model(args: argparse.Namespace) -> Any:
    """The checkpoint on ``--device`` in ``--dtype`` with the ``--attn`` backend."""
    return LlavaForConditionalGeneration.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn).to(args.device).eval()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant at every budget on the split (see the module docstring)."""
    model = load_model(args)
    items = sv.eval_set_with_owners(args.items)
    split = [item for item, _ in items]
    # one tick per evaluation of the split: all tokens, blank image, two floors, every variant x budget
    progress = tqdm(total=4 + len(args.variants) * len(args.budgets), desc="evaluations", unit="eval")
    full = sv.evaluate(model, split)
    progress.update()
    blank = sv.evaluate(model, split, blank=True)["all"]
    progress.update()
    prior = answer_prior(split)
    progress.write(f"all {sv.N_VISUAL} tokens: {full['all']:.1%}   blank image: {blank:.1%}   "
                   f"best constant answer per question type: {prior:.1%}")
    # How much the text has already read from the image before the prune layer: keep a single
    # (evenly placed) visual token from there on. Any selector at that layer starts from this.
    floor = {}
    for layer in (1, 2):
        pio_fvlm.wrap(model, budget=1, layer=layer, selector=UniformSelector())
        floor[layer] = sv.evaluate(model, split)["all"]
        pio_fvlm.unwrap(model)
        progress.update()
        progress.write(f"one visual token left from layer {layer} on: {floor[layer]:.1%} "
                       f"(retention {floor[layer] / full['all']:.1%})")
    rows: dict[str, dict[int, float]] = {}
    coverage: dict[str, dict[int, float]] = {}
    token_share: dict[str, dict[int, float]] = {}
    header = f"{'selector':<22}" + "".join(f"{b:>9}" for b in args.budgets)
    progress.write("retention (accuracy / all-token accuracy)\n" + header)
    for name in args.variants:
        rows[name], coverage[name], token_share[name] = {}, {}, {}
        for budget in args.budgets:
            kwargs = settings(name, budget)
            if kwargs.get("selector") is ORACLE:
                ORACLE.load(items)
            pio_fvlm.wrap(model, budget=budget, **kwargs)
            rows[name][budget], coverage[name][budget], token_share[name][budget] = accuracy_and_coverage(model, items)
            pio_fvlm.unwrap(model)
            progress.update()
        progress.write(f"{name:<22}" + "".join(f"{rows[name][b] / full['all']:>9.1%}" for b in args.budgets)
                       + "   objects seen: " + " ".join(f"{coverage[name][b]:.0%}" for b in args.budgets)
                       + "   their tokens kept: " + " ".join(f"{token_share[name][b]:.0%}" for b in args.budgets))
    progress.close()
    result = {"items": args.items, "device": str(model.device), "dtype": args.dtype, "attn": args.attn,
              "full": full, "blank": blank, "answer_prior": prior, "accuracy": rows,
              "one_token_from_layer": floor, "questions_with_every_object_kept": coverage,
              "share_of_object_tokens_kept": token_share, "training_step": training_step(Path(args.model))}
    return result


def training_step(model: Path) -> int | None:
    """The step a checkpoint was saved at: its own ``training_state.json`` (written by
    training/train_tiny_vlm.py), or the shipped model's record under training/records/."""
    for state in (model / "training_state.json", SHIPPED_TRAINING_STATE):
        if state.exists() and (state != SHIPPED_TRAINING_STATE or model.resolve() == Path(sv.ASSET_DIR).resolve()):
            return int(json.loads(state.read_text())["step"])
    return None


def default_out(model: str | Path) -> Path:
    """The shipped checkpoint's record lives in benchmarks/results/; any other model's next to it."""
    if Path(model).resolve() == Path(sv.ASSET_DIR).resolve():
        return Path("benchmarks/results/quality.json")
    return Path(model) / "quality.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64, 32, 16])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--out", default=None,
                   help="where to write the JSON result; default: benchmarks/results/quality.json for the "
                        "shipped checkpoint, <model>/quality.json for any other (so a run never overwrites "
                        "the shipped checkpoint's record)")
    p.add_argument("--model", default=str(sv.ASSET_DIR), help="a tiny-shapes checkpoint folder")
    p.add_argument("--device", default="cpu", help="e.g. cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="attention backend (FastV reads attention from the layer's projections: any works)")
    p.add_argument("--table", metavar="JSON", help="print the markdown table of a saved result and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        print(markdown_table(result))
        return result
    out = Path(args.out) if args.out else default_out(args.model)
    with torch.no_grad():  # scoped: the caller's grad mode is left alone
        result = measure(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
