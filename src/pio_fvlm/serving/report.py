"""What was pruned for each served request: visual tokens seen and kept.

transformers' server runs ``model.generate`` on an inference thread, away from the request that
asked for it. The request's id travels with its inputs: the HTTP layer sets it in a context
variable, the processor's ``apply_chat_template`` (called in the request's context) adds it to
the inputs under :data:`REQUEST_KEY`, and the model's ``generate`` takes it out again and records
the counts right after the prefill (so they are ready before the last streamed token).
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..api import is_wrapped, last_selection

REQUEST_KEY = "pio_fvlm_request_id"
current_request: contextvars.ContextVar[str | None] = contextvars.ContextVar("pio_fvlm_request", default=None)


@dataclass(frozen=True)
class VisualTokens:
    """Visual tokens of one request's prompt: ``seen`` in the prompt, ``kept`` by the deepest
    layers (equal to ``seen`` when nothing was pruned)."""

    seen: int
    kept: int

    def as_dict(self) -> dict[str, int]:
        return {"seen": self.seen, "kept": self.kept}


class PruningReports:
    """Per-request :class:`VisualTokens`, from the generate call to the HTTP response."""

    def __init__(self) -> None:
        self._reports: dict[str, VisualTokens] = {}
        self._lock = threading.Lock()
        self._pending = threading.local()  # on the inference thread: (request id, seen) of the running generate

    # ------------------------------------------------------------------ request side
    def pop(self, request_id: str) -> VisualTokens | None:
        """The report of ``request_id`` (once), or None if its generate recorded none."""
        with self._lock:
            return self._reports.pop(request_id, None)

    def tag_processor(self, processor: Any) -> Any:
        """Make ``processor.apply_chat_template`` add the current request's id to the inputs it returns."""
        original = processor.apply_chat_template

        @functools.wraps(original)
        def apply_chat_template(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            request_id = current_request.get()
            if request_id is not None and isinstance(out, MutableMapping) and "input_ids" in out:
                out[REQUEST_KEY] = request_id
            return out

        processor.apply_chat_template = apply_chat_template
        return processor

    # ------------------------------------------------------------------ model side
    def watch_model(self, model: Any, visual_token_ids: Sequence[int]) -> Any:
        """Make ``model.generate`` accept the request id and record the request's counts after its
        prefill; ``visual_token_ids`` are the model's visual placeholder ids."""
        original = model.generate
        ids = torch.tensor(list(visual_token_ids))

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            request_id = kwargs.pop(REQUEST_KEY, None)
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if request_id is None or not isinstance(input_ids, torch.Tensor):
                return original(*args, **kwargs)
            seen = int(torch.isin(input_ids, ids.to(input_ids.device)).sum())
            self._pending.value = (request_id, seen)
            try:
                return original(*args, **kwargs)
            finally:
                self._pending.value = None

        def after_forward(module: nn.Module, args: Any, output: Any) -> None:
            pending = getattr(self._pending, "value", None)
            if pending is None:
                return
            self._pending.value = None  # the first forward of a generate is its prefill
            request_id, seen = pending
            kept = seen
            if seen and is_wrapped(model):
                selection = last_selection(model)
                kept = sum(len(row) for row in selection) if selection is not None else seen
            with self._lock:
                self._reports[request_id] = VisualTokens(seen=seen, kept=kept)

        model.generate = generate
        model.register_forward_hook(after_forward)
        return model
