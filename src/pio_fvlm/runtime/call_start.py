"""Step 1 of a call: it starts, and the runtime finds where its visual tokens are.

The pre-hook on the VLM's base module reads the call's ``input_ids`` and padding mask, counts
each row's visual tokens (one host read), checks that the prompt holds the proxy window, and
opens the call's :class:`~pio_fvlm.runtime.state.CallState`. A fresh prefill into a reused
cache object forgets that cache's record.

:class:`CallStart` also declares the state every step reads (set by
:class:`~pio_fvlm.runtime.hooks.Runtime`), so that each step's class says what it uses.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import weakref
from typing import Any

import torch

from ..compat import layer_cache
from ..config import PruneConfig, StageBudget
from ..models.base import ModelParts
from ..select.selector import ProbeKind, ProxyWindow, Selector
from .state import CacheRecord, CallState

logger = logging.getLogger("pio_fvlm")


class CallStart:
    """The runtime's step that finds a call's visual tokens (see the module's docstring)."""

    parts: ModelParts
    config: PruneConfig
    stages: list[tuple[int, StageBudget]]
    selectors: list[Selector]
    windows: list[ProxyWindow]
    probes: list[ProbeKind]
    stage_of: dict[int, int]
    _records: weakref.WeakKeyDictionary[Any, CacheRecord]
    _lock: threading.Lock
    _call: contextvars.ContextVar[CallState | None]
    _tokens: dict[int, contextvars.Token[CallState | None]]
    _last: tuple[torch.Tensor, list[torch.Tensor | None]] | None
    _warned: set[str]
    _id_tensors: dict[str, torch.Tensor]
    _true: dict[str, torch.Tensor]

    def _visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: positions holding a visual placeholder id."""
        ids = self.parts.visual_token_ids
        if len(ids) == 1:
            return input_ids == ids[0]
        key = str(input_ids.device)
        if key not in self._id_tensors:  # made once per device: no host-to-device copy per call
            self._id_tensors[key] = torch.tensor(ids, device=input_ids.device)
        return torch.isin(input_ids, self._id_tensors[key])

    def _check_proxy_window(self, shortest: int) -> None:
        """The proxy loss reads K positions before a row's last token (or ending at it): a prompt
        shorter than that has no such window (the authors' slicing would silently use fewer)."""
        window = max(self.windows, key=ProxyWindow.prompt_tokens_needed)
        need = window.prompt_tokens_needed()
        if shortest < need:
            fits = shortest - (0 if window.includes_last else 1)
            raise ValueError(
                f"a prompt of {shortest} tokens is too short for proxy_tokens={window.tokens}: the proxy loss "
                f"reads the {window.tokens} positions before the last token, which needs {need} tokens; wrap "
                f"with proxy_tokens <= {max(fits, 1)} for prompts this short"
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _call_start(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"pio_fvlm needs the 2-D padding attention_mask (batch, sequence) that the processor "
                f"returns; got a {mask.dim()}-D mask. Pass the processor's attention_mask instead."
            )
        visual, n_visual, q_len, all_valid = None, [], 0, True
        if input_ids is not None:
            q_len = input_ids.shape[1]
            if q_len > 1:  # decode steps (one token) never hold visual tokens: no host read there
                visual = self._visual_mask(input_ids)
                shortest = q_len
                if mask is not None:  # one host read for both counts
                    visual_counts, valid_counts = torch.stack((visual, mask[:, -q_len:])).sum(-1).tolist()
                    n_visual = [int(n) for n in visual_counts]  # the mask may be a float tensor
                    shortest = int(min(valid_counts))
                    all_valid = shortest == q_len
                else:
                    n_visual = visual.sum(1).tolist()
                if not any(n_visual):
                    visual = None
                else:
                    self._check_proxy_window(shortest)
        elif kwargs.get("inputs_embeds") is not None:
            q_len = kwargs["inputs_embeds"].shape[1]
            if q_len > 1:
                self._warn_once(
                    "embeds",
                    "pio_fvlm: the model was called with inputs_embeds and no input_ids, so the visual "
                    "tokens cannot be located and nothing is pruned; pass input_ids to prune.",
                )
        cache = layer_cache(kwargs)
        if cache is not None and cache.get_seq_length() == 0:
            with self._lock:
                self._records.pop(cache, None)  # a fresh prefill into a reused cache object
        call = CallState(visual=visual, n_visual=n_visual, attention_mask=mask, q_len=q_len, all_valid=all_valid)
        self._tokens[id(call)] = self._call.set(call)
