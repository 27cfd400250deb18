"""Load on a served model: pruned against unpruned, side by side.

    python benchmarks/serve_load.py                                  # the demo model on this machine
    python benchmarks/serve_load.py --model llava-hf/llava-1.5-7b-hf --device cuda:0 --dtype float16

Starts ``pio-fvlm serve`` twice (pruned with ``--budget``, and ``--no-pruning``), both on
127.0.0.1, then for each number of concurrent clients N (default 1, 4, 16) sends N clients'
requests to one server at a time (pruned, then unpruned, for each N), each client posting
``--requests`` chat completions back to back, each with a different image. Reports requests per
second and the p50 / p95 latency of each, and checks that every answer came back (HTTP 200)
with the visual tokens it reports. Writes JSON to ``benchmarks/results/``.

transformers' server runs one ``generate`` at a time per model, so N concurrent clients queue:
requests/s stays at one server's rate and latency grows with N. Pruning shortens each request.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from pio_fvlm import synthetic as syn
from pio_fvlm.serving import DEMO_NAME
from pio_fvlm.serving.client import ServerProcess, chat_body, post_chat

RESULTS = Path(__file__).resolve().parent / "results"
GENERIC_QUESTIONS = ("What is shown in the image?", "Describe the image in one sentence.",
                     "How many shapes are there?", "What colours do you see?")


def request_bodies(model: str, count: int, max_tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` chat requests, each on its own synthetic scene: the demo model's own questions
    for the demo, plain questions for a real checkpoint."""
    rng = random.Random(seed)
    bodies = []
    for i in range(count):
        objects = syn.random_scene(rng, 1 + i % 4)
        image = Image.fromarray(syn.render(objects, rng))
        if model == DEMO_NAME:
            question = rng.choice(syn.questions(objects, rng)).question
        else:
            question = GENERIC_QUESTIONS[i % len(GENERIC_QUESTIONS)]
        bodies.append(chat_body(question, image, model=model, max_tokens=max_tokens, temperature=0))
    return bodies


def measure_load(url: str, bodies: list[dict[str, Any]], clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads each posting ``requests`` bodies (taken in turn from ``bodies``):
    requests/s over the whole run, latency percentiles, and what the answers reported."""

    def client(index: int) -> list[tuple[float, int, Any]]:
        out = []
        for r in range(requests):
            body = bodies[(index * requests + r) % len(bodies)]
            start = time.perf_counter()
            status, _, reply = post_chat(url, body, timeout=600)
            out.append((time.perf_counter() - start, status, reply))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for batch in pool.map(client, range(clients)) for item in batch]
    wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _, _ in results)
    ok = [reply for _, status, reply in results if status == 200]
    kept = sorted({json.dumps(reply["usage"].get("visual_tokens")) for reply in ok})
    return {
        "clients": clients,
        "requests": len(results),
        "ok": len(ok),
        "requests_per_s": len(results) / wall,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p95_ms": 1e3 * latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "visual_tokens": [json.loads(k) for k in kept],
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per N, pruned and unpruned side by side."""
    by = {(row["server"], row["clients"]): row for row in rows}
    lines = ["| clients | req/s unpruned | req/s pruned | p50 ms unpruned | p50 ms pruned | p95 ms unpruned | "
             "p95 ms pruned |", "|---|---|---|---|---|---|---|"]
    for n in sorted({row["clients"] for row in rows}):
        full, pruned = by[("unpruned", n)], by[("pruned", n)]
        lines.append(f"| {n} | {full['requests_per_s']:.2f} | {pruned['requests_per_s']:.2f} | "
                     f"{full['p50_ms']:.0f} | {pruned['p50_ms']:.0f} | {full['p95_ms']:.0f} | {pruned['p95_ms']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_NAME, help="what pio-fvlm serve serves (default: the demo model)")
    p.add_argument("--budget", default="64", help="visual tokens the pruned server keeps (default 64)")
    p.add_argument("--clients", default="1,4,16", help="numbers of concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=8, help="requests each client sends (default 8)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    p.add_argument("--device", default="auto", help="pio-fvlm serve --device")
    p.add_argument("--dtype", default="auto", help="pio-fvlm serve --dtype")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serve-load-<model>.json)")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.clients.split(",")]
    bodies = request_bodies(args.model, 32, args.max_tokens)
    common = [args.model, "--device", args.device, "--dtype", args.dtype]
    rows = []
    with ServerProcess([*common, "--budget", args.budget]) as pruned, ServerProcess([*common, "--no-pruning"]) as full:
        for server in (pruned, full):
            measure_load(server.url, bodies, 1, 2)  # warm-up: first-call costs are not load
        for n in counts:
            for name, server in (("pruned", pruned), ("unpruned", full)):
                row = {"server": name, **measure_load(server.url, bodies, n, args.requests)}
                rows.append(row)
                print(f"{name:>8}  clients {n:>3}: {row['requests_per_s']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, "
                      f"p95 {row['p95_ms']:.0f} ms, {row['ok']}/{row['requests']} answered, "
                      f"visual tokens {row['visual_tokens']}", flush=True)
    print()
    print(table(rows))
    out = Path(args.out) if args.out else RESULTS / f"serve-load-{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import os

    import torch

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    settings = {"model": args.model, "budget": args.budget, "requests_per_client": args.requests,
                "max_tokens": args.max_tokens, "device": args.device, "dtype": args.dtype, "machine": machine,
                "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
