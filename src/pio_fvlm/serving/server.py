"""``pio-fvlm serve``: load a VLM, wrap it, serve it with dynamic batching on Uvicorn.

The model is loaded and wrapped before the server listens, so bad settings raise here with
:func:`~pio_fvlm.wrap`'s messages. Only FastAPI, Uvicorn and the ``openai`` types are used, no
server internals of transformers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from ..api import wrap
from .app import build_app
from .batcher import DynamicBatcher
from .core import BatchGenerator

DEMO_NAME = "pio-fvlm-demo"  # the shipped demo model, served under this name


def serving_available() -> bool:
    """Whether the ``serve`` extra (FastAPI, Uvicorn, openai) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn", "openai"))


def load_model(model: str, *, device: str = "auto", dtype: str = "auto",
               attn_implementation: str | None = None) -> tuple[Any, Any]:
    """(model, processor) of an HF id or folder (``"pio-fvlm-demo"``: the shipped demo model), in eval mode."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..shapes_vlm import ASSET_DIR

    path = str(ASSET_DIR) if model == DEMO_NAME else model
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype, dtype),
                              "device_map": device}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    loaded = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
    return loaded, AutoProcessor.from_pretrained(path)


def check_settings(model: str, settings: dict[str, Any] | None) -> None:
    """Raise :func:`~pio_fvlm.wrap`'s error for bad ``settings``, on a weightless copy of the
    model built from its configuration (nothing is loaded)."""
    if settings is None:
        return
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..shapes_vlm import ASSET_DIR

    config = AutoConfig.from_pretrained(str(ASSET_DIR) if model == DEMO_NAME else model)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    wrap(skeleton, **settings)


@dataclass
class RunningServer:
    """A server running in a background thread (``serve(..., block=False)``)."""

    server: Any
    thread: threading.Thread
    batcher: DynamicBatcher

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.batcher.close()


def serve(model: str = DEMO_NAME, settings: dict[str, Any] | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, device: str = "auto", dtype: str = "auto", attn_implementation: str | None = None,
          max_batch_size: int = 8, batch_wait_ms: float = 10.0, log_level: str = "warning",
          block: bool = True) -> RunningServer | None:
    """Serve ``model`` (an HF id, a folder, or ``"pio-fvlm-demo"``) pruned with the :func:`~pio_fvlm.wrap`
    keywords ``settings`` (``{}``: the defaults; ``None``: unpruned) on ``host:port``, answering
    concurrent requests in batches of at most ``max_batch_size`` (waiting ``batch_wait_ms`` for
    a batch to fill). ``block=False`` returns a :class:`RunningServer` (``.stop()`` stops it).
    """
    if not serving_available():
        raise ImportError("serving needs FastAPI, Uvicorn and openai: pip install 'pio-fvlm[serve]'")
    import uvicorn

    generator = batch_generator(model, settings, device=device, dtype=dtype, attn_implementation=attn_implementation)
    batcher = DynamicBatcher(generator, max_batch_size=max_batch_size, wait_ms=batch_wait_ms)
    server = uvicorn.Server(uvicorn.Config(build_app(batcher.answer, model), host=host, port=port, log_level=log_level))
    if block:
        try:
            server.run()
        finally:
            batcher.close()
        return None
    thread = threading.Thread(target=server.run, name="pio-fvlm-serve", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    return RunningServer(server, thread, batcher)


def batch_generator(model: str, settings: dict[str, Any] | None, *, device: str = "auto", dtype: str = "auto",
                    attn_implementation: str | None = None) -> BatchGenerator:
    """The batched-generation core over ``model`` loaded (see :func:`load_model`) and wrapped with
    the :func:`~pio_fvlm.wrap` keywords ``settings`` (``None``: unpruned)."""
    loaded, processor = load_model(model, device=device, dtype=dtype, attn_implementation=attn_implementation)
    if settings is not None:
        wrap(loaded, **settings)
    return BatchGenerator(loaded, processor)
