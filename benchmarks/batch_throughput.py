"""Rows per second of ``pio-fvlm batch``: unpruned against pruned, on the same file of rows.

    python benchmarks/batch_throughput.py                  # the LLaVA-1.5 miniature, 48 rows, on this machine
    python benchmarks/batch_throughput.py --engine ray --concurrency 2
    python benchmarks/batch_throughput.py --model llava-hf/llava-1.5-7b-hf --device cuda:0 --dtype float16

Writes ``--rows`` rows (each a synthetic scene saved as PNG, and a question) to a JSONL file,
answers them once with ``--no-pruning`` and once pruned to ``--budget``, each job from a fresh
OUTPUT (so nothing is skipped), and reports each job's wall-clock time (model loading included:
it is part of what a job costs) and rows per second. JSON goes to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from miniature_checkpoint import MINIATURE, save_miniature_llava
from PIL import Image

from pio_fvlm import synthetic as syn
from pio_fvlm.serving.batch_job import BatchJob, run_batch

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = ("What is shown in the image?", "How many shapes are there?", "What colours do you see?")


def write_rows(folder: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(folder / "rows.jsonl", "w") as handle:
        for i in range(count):
            Image.fromarray(syn.render(syn.random_scene(rng, 1 + i % 4), rng)).save(folder / f"scene{i}.png")
            row = {"id": i, "image": f"scene{i}.png", "prompt": QUESTIONS[i % len(QUESTIONS)]}
            handle.write(json.dumps(row) + "\n")
    return folder / "rows.jsonl"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MINIATURE, help=f"what to load (default {MINIATURE}: random weights)")
    p.add_argument("--budget", type=int, default=64, help="visual tokens the pruned job keeps (default 64)")
    p.add_argument("--rows", type=int, default=48, help="rows in the file (default 48)")
    p.add_argument("--batch-size", type=int, default=8, help="pio-fvlm batch --batch-size (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens of each answer (default 8)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="pio-fvlm batch --engine")
    p.add_argument("--concurrency", type=int, default=1, help="model replicas (ray engine)")
    p.add_argument("--device", default="auto", help="device of the model")
    p.add_argument("--dtype", default="auto", help="weights' dtype")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/batch-throughput-<model>.json)")
    args = p.parse_args(argv)
    model = args.model
    if model == MINIATURE:
        model = str(save_miniature_llava())
    with tempfile.TemporaryDirectory() as scratch:
        rows_file = write_rows(Path(scratch), args.rows)
        results = []
        for name, settings in (("unpruned", None), ("pruned", {"budget": args.budget})):
            job = BatchJob(model=model, settings=settings, engine=args.engine, batch_size=args.batch_size,
                           concurrency=args.concurrency, max_new_tokens=args.max_new_tokens, device=args.device,
                           dtype=args.dtype)
            start = time.perf_counter()
            summary = run_batch(rows_file, Path(scratch) / f"{name}.jsonl", job, progress=False)
            seconds = time.perf_counter() - start
            answers = [json.loads(line) for line in (Path(scratch) / f"{name}.jsonl").read_text().splitlines()]
            kept = sorted({a["visual_tokens_kept"] for a in answers})
            results.append({"job": name, "rows": summary.answered, "errors": summary.errors, "seconds": seconds,
                            "rows_per_s": summary.answered / seconds, "visual_tokens_kept": kept})
            print(f"{name:>9}: {summary.answered} rows in {seconds:.1f} s = {summary.answered / seconds:.2f} rows/s, "
                  f"{summary.errors} errors, visual tokens kept {kept}", flush=True)
    ratio = results[1]["rows_per_s"] / results[0]["rows_per_s"]
    print(f"pruned / unpruned rows/s: {ratio:.2f}x")
    import torch

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    settings_out = {"model": args.model, "engine": args.engine, "concurrency": args.concurrency,
                    "budget": args.budget, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                    "device": args.device, "dtype": args.dtype, "machine": machine, "threads": torch.get_num_threads()}
    suffix = "-ray" if args.engine == "ray" else ""
    out = Path(args.out) if args.out else RESULTS / f"batch-throughput-{args.model.replace('/', '_')}{suffix}.json"
    out.write_text(json.dumps({"settings": settings_out, "jobs": results, "pruned_over_unpruned": ratio},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
