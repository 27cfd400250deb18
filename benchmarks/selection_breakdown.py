"""Where PIO-FVLM's selection time goes: the gradient probe vs the NMS, on one captured request.

    python benchmarks/selection_breakdown.py --out benchmarks/results/gpu   # LLaVA-1.5-7B shapes, bf16, GPU
    python benchmarks/selection_breakdown.py --small --device cpu --dtype float32 --out /tmp/sel

The wrapped model's first prefill hands its ``SelectionRequest`` to a recording selector; the probe
(:meth:`PioSelector.saliency`) and the NMS (:func:`select_with_nms`) then run on it ``--reps`` times each,
synchronised, at batch 1 and ``--batch``. Random weights (benchmarks/gpu_check.py builds the model), so
the NMS's work is that of random-weight features: real images can suppress more (longer walks).
Writes ``selection-breakdown.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import pio_fvlm
from pio_fvlm.measure import timed
from pio_fvlm.select import PioSelector
from pio_fvlm.select import nms as nms_module
from pio_fvlm.select.nms import select_with_nms
from pio_fvlm.select.selector import SelectionRequest

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import build, prompts_batch  # noqa: E402


class Recorder(PioSelector):
    """PIO-FVLM that keeps the last request it was given."""

    request: SelectionRequest | None = None

    def __call__(self, request: SelectionRequest) -> torch.Tensor:
        self.request = request
        return super().__call__(request)


def breakdown(model: torch.nn.Module, batch_size: int, budget: int, reps: int, small: bool) -> dict[str, Any]:
    recorder = Recorder()
    pio_fvlm.wrap(model, budget=budget, selector=recorder)
    with torch.no_grad():
        model(**prompts_batch(model, [(s, 40) for s in range(batch_size)], small))
    pio_fvlm.unwrap(model)
    request = recorder.request
    assert request is not None, "the wrapped prefill did not select"
    walks: list[int] = []
    inner = nms_module.suppression_matrix

    def counted(features: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        walks.append(features.shape[1])
        return inner(features, *args, **kwargs)

    saliency = recorder.saliency(request)
    ms = {}
    ms["probe"] = [1000 * timed(lambda: recorder.saliency(request))[0] for _ in range(reps)]
    nms_module.suppression_matrix = counted
    try:
        def run_nms() -> torch.Tensor:
            return select_with_nms(saliency, request.probe_inputs.hidden, request.candidates, request.budgets,
                                   request.config.nms_threshold)
        run_nms()
        prefixes = list(walks)
        ms["nms"] = [1000 * timed(run_nms)[0] for _ in range(reps)]
    finally:
        nms_module.suppression_matrix = inner
    ms["selection"] = [1000 * timed(lambda: recorder(request))[0] for _ in range(reps)]
    return {"batch": batch_size, "nms_prefixes_walked": prefixes,
            **{f"{k}_ms_median": round(statistics.median(v), 3) for k, v in ms.items()},
            **{f"{k}_ms_min": round(min(v), 3) for k, v in ms.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-1.5-7b", choices=["llava-1.5-7b", "qwen2.5-vl-7b"])
    p.add_argument("--small", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model = build(args.model, args.small, getattr(torch, args.dtype), args.device)
    budget = 8 if args.small else args.budget
    rows = [breakdown(model, b, budget, args.reps, args.small) for b in (1, args.batch)]
    for row in rows:
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection-breakdown.json").write_text(json.dumps(
        {"model": args.model, "dtype": args.dtype, "budget": budget, "torch": torch.__version__, "rows": rows},
        indent=1))


if __name__ == "__main__":
    main()
