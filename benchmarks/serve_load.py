"""Load on a served model: unpruned one request at a time, unpruned batched, pruned batched.

    python benchmarks/serve_load.py                                  # the demo model on this machine
    python benchmarks/serve_load.py --model llava-1.5-miniature --clients 1,4,16,64 --requests 2
    python benchmarks/serve_load.py --model llava-hf/llava-1.5-7b-hf --device cuda:0 --dtype float16
    python benchmarks/serve_load.py --engine ray                     # the same servers on Ray Serve

``llava-1.5-miniature`` is the 32-layer LLaVA-1.5 miniature with random weights (576 visual
tokens, answers of exactly ``--max-tokens`` tokens; see ``miniature_checkpoint.py``).

Starts ``pio-fvlm serve`` three times on 127.0.0.1 (``--no-pruning --max-batch-size 1``,
``--no-pruning``, and pruned with ``--budget``; the last two batch concurrent requests, at most
``--max-batch-size``), then for each number of concurrent clients N (default 1, 4, 16) sends N
clients' requests to one server at a time, each client posting
``--requests`` chat completions back to back, each with a different image. Reports requests per
second and the p50 / p95 latency of each, and checks that every answer came back (HTTP 200)
with the visual tokens it reports. Writes JSON to ``benchmarks/results/``.

One request at a time, N concurrent clients queue: requests/s stays at one request's rate and
latency grows with N. Batching answers up to ``--max-batch-size`` of them with one ``generate``;
pruning shortens each batch's prefill and cache.
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

from miniature_checkpoint import MINIATURE, save_miniature_llava
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

    def client(index: int) -> list[tuple[float, int, Any, int]]:
        out = []
        for r in range(requests):
            body = bodies[(index * requests + r) % len(bodies)]
            start = time.perf_counter()
            status, headers, reply = post_chat(url, body, timeout=600)
            out.append((time.perf_counter() - start, status, reply, int(headers.get("x-pio-fvlm-batch-size", 0))))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for batch in pool.map(client, range(clients)) for item in batch]
    wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _, _, _ in results)
    ok = [reply for _, status, reply, _ in results if status == 200]
    kept = sorted({json.dumps(reply["usage"].get("visual_tokens")) for reply in ok})
    return {
        "clients": clients,
        "requests": len(results),
        "ok": len(ok),
        "requests_per_s": len(results) / wall,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p95_ms": 1e3 * latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "visual_tokens": [json.loads(k) for k in kept],
        "batch_sizes": sorted({size for _, _, _, size in results}),
    }


SERVERS = ("unpruned sequential", "unpruned batched", "pruned batched")


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per N, requests/s and latencies of each server, and pruned batched's
    requests/s over unpruned sequential's."""
    by = {(row["server"], row["clients"]): row for row in rows}
    lines = ["| clients | " + " | ".join(f"req/s {name}" for name in SERVERS) + " | pruned batched / unpruned "
             "sequential | " + " | ".join(f"p50 / p95 ms {name}" for name in SERVERS) + " |",
             "|---" * (2 + 2 * len(SERVERS)) + "|"]
    for n in sorted({row["clients"] for row in rows}):
        cells = [by[(name, n)] for name in SERVERS]
        ratio = cells[2]["requests_per_s"] / cells[0]["requests_per_s"]
        lines.append(f"| {n} | " + " | ".join(f"{c['requests_per_s']:.2f}" for c in cells) + f" | {ratio:.2f}x | "
                     + " | ".join(f"{c['p50_ms']:.0f} / {c['p95_ms']:.0f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_NAME, help="what pio-fvlm serve serves (default: the demo model)")
    p.add_argument("--budget", default="64", help="visual tokens the pruned server keeps (default 64)")
    p.add_argument("--clients", default="1,4,16", help="numbers of concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=8, help="requests each client sends (default 8)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    p.add_argument("--max-batch-size", default="8", help="pio-fvlm serve --max-batch-size of the batched servers")
    p.add_argument("--device", default="auto", help="pio-fvlm serve --device")
    p.add_argument("--dtype", default="auto", help="pio-fvlm serve --dtype")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="pio-fvlm serve --engine")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/serve-load-<model>[-ray].json)")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.clients.split(",")]
    bodies = request_bodies(args.model, 32, args.max_tokens)
    served = args.model
    if args.model == MINIATURE:
        served = str(save_miniature_llava())
        for body in bodies:
            body["model"] = served  # a server answers to the name it was started with
    common = [served, "--engine", args.engine, "--device", args.device, "--dtype", args.dtype]
    rows = []
    arguments = {"unpruned sequential": ["--no-pruning", "--max-batch-size", "1"],
                 "unpruned batched": ["--no-pruning", "--max-batch-size", args.max_batch_size],
                 "pruned batched": ["--budget", args.budget, "--max-batch-size", args.max_batch_size]}
    for name in SERVERS:  # one server at a time: they would share the same cores
        with ServerProcess([*common, *arguments[name]]) as server:
            measure_load(server.url, bodies, 1, 2)  # warm-up: first-call costs are not load
            for n in counts:
                row = {"server": name, **measure_load(server.url, bodies, n, args.requests)}
                rows.append(row)
                print(f"{name:>20}  clients {n:>3}: {row['requests_per_s']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, "
                      f"p95 {row['p95_ms']:.0f} ms, {row['ok']}/{row['requests']} answered, "
                      f"visual tokens {row['visual_tokens']}, batch sizes {row['batch_sizes']}", flush=True)
    print()
    print(table(rows))
    suffix = "-ray" if args.engine == "ray" else ""
    out = Path(args.out) if args.out else RESULTS / f"serve-load-{args.model.replace('/', '_')}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import os

    import torch

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    settings = {"model": args.model, "engine": args.engine, "budget": args.budget,
                "max_batch_size": args.max_batch_size, "requests_per_client": args.requests,
                "max_tokens": args.max_tokens, "device": args.device, "dtype": args.dtype, "machine": machine,
                "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
