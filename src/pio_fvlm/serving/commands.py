"""``pio-fvlm serve`` and ``pio-fvlm batch``: their options and what they run.

Both take every :func:`~pio_fvlm.wrap` setting as an option, and an ``--engine``: ``ray`` (the
default when Ray is installed: replicas on this machine or a cluster) or ``local`` (this
process). Bad settings exit 2 with ``wrap``'s message before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

WRAP_OPTIONS = ("budget", "layer", "preset", "nms_threshold", "proxy_tokens", "positions", "encoder", "encoder_budget")


def _budget(text: str) -> int | float:
    """"64" -> 64 tokens, "0.25" or "1.0" -> a fraction (as wrap's int / float budgets)."""
    return int(text) if text.lstrip("+-").isdigit() else float(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}")
    return int(text)


def _threshold(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Every wrap setting (wrap's own defaults apply to what is not given) and where the model runs."""
    unset = argparse.SUPPRESS
    p.add_argument("--budget", type=_budget, default=unset, help="visual tokens kept per prompt, or a fraction < 1")
    p.add_argument("--layer", type=int, default=unset, help="decoder layer from which on tokens are pruned (default 1)")
    p.add_argument("--preset", default=unset,
                   help="a named schedule instead of --budget/--layer (paper-64, paper-128, ...)")
    p.add_argument("--nms-threshold", type=_threshold, default=unset,
                   help="cosine threshold of the NMS (default 0.8; none: off)")
    p.add_argument("--proxy-tokens", type=int, default=unset, help="prompt positions of the proxy loss (default 4)")
    p.add_argument("--positions", choices=["keep", "compact"], default=unset,
                   help="position ids of kept tokens (default keep)")
    p.add_argument("--encoder", choices=["visionzip"], default=unset,
                   help="reduce visual tokens in the vision encoder first")
    p.add_argument("--encoder-budget", type=int, default=unset, help="tokens the encoder-side reduction keeps")
    p.add_argument("--capture", action="store_true", help="run the probe as one captured graph (GPU, batch 1)")
    p.add_argument("--no-pruning", action="store_true", help="run the model unpruned (for comparisons)")
    p.add_argument("--device", default="auto", help="device map of the model (auto, cpu, cuda:0, ...)")
    p.add_argument("--dtype", default="auto", help="weights' dtype (auto: the checkpoint's; float16, bfloat16, ...)")
    p.add_argument("--attn-implementation", help="attention implementation (eager, sdpa, flash_attention_2)")
    p.add_argument("--engine", choices=["local", "ray"], default=None,
                   help="ray: Ray replicas, here or on a cluster (the default when Ray is installed); "
                        "local: this process")
    p.add_argument("--num-gpus-per-replica", type=float, default=None,
                   help="GPUs Ray gives each replica (default 1 when CUDA is available, else 0)")
    p.add_argument("--num-cpus-per-replica", type=float, default=None,
                   help="CPUs Ray gives each replica, and torch's threads there (default 1)")
    p.add_argument("--address", default=None,
                   help="the Ray cluster to join (auto: the one running on this machine); default: start a local one")


def _wrap_settings(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, Any] | None:
    """The wrap keywords given (``None`` with ``--no-pruning``)."""
    settings: dict[str, Any] = {name: getattr(args, name) for name in WRAP_OPTIONS if hasattr(args, name)}
    if args.capture:
        settings["capture"] = True
    if args.no_pruning:
        if settings:
            p.error(f"--no-pruning runs the model unpruned: leave out {', '.join(sorted(settings))}")
        return None
    return settings


def _engine(args: argparse.Namespace, p: argparse.ArgumentParser, ray_flags: dict[str, Any], command: str) -> str:
    """The engine to run on; Ray-only flags without it are refused (exit 2)."""
    from .ray_engine import ray_available

    for flag in ("num_gpus_per_replica", "num_cpus_per_replica"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0; got {getattr(args, flag)}")
    ray_flags = {**ray_flags, "--num-gpus-per-replica": args.num_gpus_per_replica,
                 "--num-cpus-per-replica": args.num_cpus_per_replica, "--address": args.address}
    given = [flag for flag, value in ray_flags.items() if value is not None]
    engine: str = args.engine or ("ray" if ray_available() or given else "local")
    if given and engine != "ray":
        p.error(f"{', '.join(given)} need --engine ray")
    if engine == "ray" and not ray_available():
        p.error("--engine ray needs Ray: pip install 'pio-fvlm[ray]'")
    if args.engine is None and engine == "local":
        print(f"pio-fvlm {command}: Ray is not installed, so this runs in this process "
              "(pip install 'pio-fvlm[ray]' for replicas and clusters)", file=sys.stderr)
    if engine == "ray" and args.num_gpus_per_replica is None:
        import torch

        args.num_gpus_per_replica = 1.0 if torch.cuda.is_available() else 0.0
    return engine


def serve(argv: list[str]) -> int:
    """Serve a model pruned by PIO-FVLM behind an OpenAI-compatible server that batches concurrent requests."""
    from .server import DEMO_NAME, serving_available

    p = argparse.ArgumentParser(prog="pio-fvlm serve", description=serve.__doc__)
    p.add_argument("model", nargs="?", default=DEMO_NAME,
                   help=f"HF id or local folder of a supported VLM (default: {DEMO_NAME}, the shipped demo model)")
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-batch-size", type=_positive_int, default=8,
                   help="most requests answered by one batched generate (default 8; 1: one at a time)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others (default 10 ms)")
    p.add_argument("--log-level", default="warning", help="the local server's log level (default warning)")
    p.add_argument("--replicas", type=_positive_int, default=None, help="Ray Serve replicas of the model (default 1)")
    args = p.parse_args(argv)
    if args.batch_wait_ms < 0:
        p.error(f"--batch-wait-ms must be >= 0; got {args.batch_wait_ms}")
    settings = _wrap_settings(args, p)
    engine = _engine(args, p, {"--replicas": args.replicas}, "serve")
    if not serving_available():
        print("pio-fvlm serve needs FastAPI, Uvicorn and openai: pip install 'pio-fvlm[serve]'", file=sys.stderr)
        return 1
    common = dict(host=args.host, port=args.port, device=args.device, dtype=args.dtype,
                  attn_implementation=args.attn_implementation, max_batch_size=args.max_batch_size,
                  batch_wait_ms=args.batch_wait_ms)
    try:
        if engine == "ray":
            from .ray_engine import serve_on_ray

            serve_on_ray(args.model, settings, replicas=args.replicas or 1,
                         num_gpus_per_replica=args.num_gpus_per_replica,
                         num_cpus_per_replica=args.num_cpus_per_replica or 1.0, address=args.address, **common)
        else:
            from .server import serve as serve_here

            serve_here(args.model, settings, log_level=args.log_level, **common)
    except (TypeError, ValueError) as error:
        print(f"pio-fvlm serve: {error}", file=sys.stderr)
        return 2
    return 0


def batch(argv: list[str]) -> int:
    """Answer every row (image(s) + prompt) of a JSONL or Parquet file with a pruned model; a rerun
    after an interruption answers only the rows not yet in OUTPUT."""
    from .batch_job import BatchJob, run_batch
    from .batch_rows import DEFAULT_MAX_NEW_TOKENS
    from .server import DEMO_NAME

    p = argparse.ArgumentParser(prog="pio-fvlm batch", description=batch.__doc__,
                                epilog="Each row: 'prompt', and 'image' or 'images' (paths relative to INPUT's "
                                       "folder, URLs or image bytes); an 'id' is kept (default: the row's position). "
                                       "OUTPUT gets the row with 'answer', 'visual_tokens_seen', "
                                       "'visual_tokens_kept', token counts and 'error'.")
    p.add_argument("input", help="a .jsonl or .parquet file of rows")
    p.add_argument("output", help="where the answers go (.jsonl or .parquet); rows already there are skipped")
    p.add_argument("--model", default=DEMO_NAME,
                   help=f"HF id or local folder of a supported VLM (default: {DEMO_NAME}, the shipped demo model)")
    _add_model_options(p)
    p.add_argument("--batch-size", type=_positive_int, default=8, help="rows per generate call (default 8)")
    p.add_argument("--concurrency", type=_positive_int, default=None,
                   help="model replicas answering batches in parallel (Ray; default 1)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"most tokens of each greedy answer (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    settings = _wrap_settings(args, p)
    engine = _engine(args, p, {"--concurrency": args.concurrency}, "batch")
    job = BatchJob(model=args.model, settings=settings, engine=engine, batch_size=args.batch_size,
                   concurrency=args.concurrency or 1, max_new_tokens=args.max_new_tokens, device=args.device,
                   dtype=args.dtype, attn_implementation=args.attn_implementation,
                   num_gpus_per_replica=args.num_gpus_per_replica or 0.0,
                   num_cpus_per_replica=args.num_cpus_per_replica or 1.0, address=args.address)
    try:
        summary = run_batch(args.input, args.output, job, progress=False if args.no_progress else None)
    except (TypeError, ValueError) as error:
        print(f"pio-fvlm batch: {error}", file=sys.stderr)
        return 2
    print(f"pio-fvlm batch: {summary.rows} rows, {summary.skipped} answered before, {summary.answered} now "
          f"({summary.errors} with an error) -> {args.output}")
    return 0
