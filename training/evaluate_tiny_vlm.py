"""All-token accuracy of a tiny-shapes checkpoint on the splits docs/quality.md reports.

    python training/evaluate_tiny_vlm.py --model src/pio_fvlm/assets/tiny-llava-shapes   # ~3 min
    python training/evaluate_tiny_vlm.py --model runs/eight --out runs/eight/eval.json

One line per split, ``<split> <json>`` (overall, per question type, per object count), the format
of the ``eval.txt`` files in ``benchmarks/results/one-run-*``:

- ``val600``: 600 questions of the training script's validation seed (777,001; the script's own
  150-question check is their first 150);
- ``test300``: the 300 test questions ``benchmarks/quality.py`` reports on;
- ``blank300``: the same questions with every image replaced by background noise (the answer prior);
- ``seed555123``: 600 questions of a third seed that no run ever looked at while training.

Nothing here is tuned on: the script only reads a finished checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from pio_fvlm import shapes_vlm as sv

THIRD_SEED = 555_123


def splits(scale: float = 1.0) -> dict[str, tuple[list[sv.EvalItem], bool]]:
    """Name -> (questions, blank images?); ``scale`` shrinks every split (tests)."""
    def n(count: int) -> int:
        return max(1, round(count * scale))

    test = sv.eval_set(n(300))
    return {"val600": (sv.eval_set(n(600), seed=sv.VALIDATION_SEED), False), "test300": (test, False),
            "blank300": (test, True), "seed555123": (sv.eval_set(n(600), seed=THIRD_SEED), False)}


@torch.no_grad()
def evaluate_all(model: torch.nn.Module, scale: float = 1.0) -> dict[str, dict[str, float]]:
    """Accuracy (``shapes_vlm.evaluate``'s dict) on every split of :func:`splits`, printed as it goes."""
    results = {}
    progress = tqdm(splits(scale).items(), desc="splits", unit="split")
    for name, (split, blank) in progress:
        results[name] = sv.evaluate(model, split, blank=blank)
        progress.write(f"{name} {json.dumps({k: round(v, 3) for k, v in results[name].items()})}")
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(sv.ASSET_DIR), help="a tiny-shapes checkpoint folder")
    p.add_argument("--out", help="also write the accuracies as JSON here")
    p.add_argument("--scale", type=float, default=1.0, help="shrink every split by this factor (quick checks)")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error("--scale must be in (0, 1]")
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    results = evaluate_all(model, args.scale)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
