"""A stage's first layer in a prefill: probe, select, plan the shortened sequence.

The pre-hook of a stage's first layer decides what the stage does in this call (prune, continue
a pruned cache, or leave the call alone), runs the stage's selector on the hidden states the
layer receives (the probe and proxy window its selector names) and builds the stage's inputs:
gathered positions, position embeddings and the attention mask of the shortened sequence.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..compat import dynamic_cache_class, layer_cache
from ..config import tokens_to_keep
from ..select.saliency import ProbeInputs, ProbeModules, proxy_query_positions
from ..select.selector import ProxyWindow, SelectionRequest
from .later_stages import LaterStages
from .masks import causal_padding_mask
from .plan import StageSource, compact_position_ids, gather_position_ids, gather_tokens, plan_stage
from .state import CallState, StageInputs

DynamicCache = dynamic_cache_class()
logger = logging.getLogger("pio_fvlm")


def hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder layer is called with (first positional argument or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


class FirstStage(LaterStages):
    """The runtime's step that probes, selects and plans a stage (see the module's docstring)."""

    def _prepare_stage(
        self, call: CallState, s: int, i: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StageInputs | None:
        cache = layer_cache(kwargs)
        if call.pruned:  # a later stage of a prefill that pruned already
            return self._prune_stage(call, s, i, hidden_of(args, kwargs), kwargs, cache)
        with self._lock:
            record = self._records.get(cache) if cache is not None else None
        if record is not None:
            return self._continue_stage(call, record, s, i, hidden_of(args, kwargs), kwargs)
        if s > 0 or call.visual is None:
            return None
        if cache is not None:
            if not isinstance(cache, DynamicCache):
                raise ValueError(
                    f"pio_fvlm supports the default DynamicCache; got {type(cache).__name__}. Call "
                    f"generate without cache_implementation (or with cache_implementation='dynamic')."
                )
            if cache.get_seq_length(i) > 0:
                self._warn_once(
                    "continued",
                    "pio_fvlm: visual tokens arrived in a call that continues an unpruned KV cache; "
                    "they are kept (only a prefill from an empty cache is pruned).",
                )
                return None
        final_counts = list(call.n_visual)
        for _, budget in self.stages:
            final_counts = [tokens_to_keep(budget, n) for n in final_counts]
        if final_counts == call.n_visual:  # the budget keeps everything: leave the model as it is
            self._warn_once(
                "noop",
                f"pio_fvlm: the budget keeps every visual token of this input ({max(call.n_visual)} at most), "
                f"so nothing is pruned; pass a smaller budget (an int below the visual-token count, or a "
                f"fraction such as budget=0.25) to prune.",
            )
            return None
        return self._prune_stage(call, s, i, hidden_of(args, kwargs), kwargs, cache)

    def _prune_stage(
        self, call: CallState, s: int, i: int, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any
    ) -> StageInputs:
        """Select this stage's tokens in a prefill and build its layers' inputs."""
        source = self._first_source(call, hidden, kwargs) if s == 0 else self._later_source(call, s, kwargs, cache)
        keep_counts = [tokens_to_keep(self.stages[s][1], n) for n in source.counts]
        if keep_counts == source.counts:  # this stage keeps everything that is left
            return self._pass_through(call, s, i, source, hidden, kwargs, cache)
        keep_visual, replacement = self._select(s, i, source, hidden, keep_counts)
        plan = plan_stage(source, keep_visual, keep_counts, self._all_true)
        if self.config.positions == "keep":
            new_ids = gather_position_ids(source.position_ids, plan.index) if source.position_ids is not None else None
            new_emb = (tuple(gather_tokens(t, plan.index) for t in source.position_embeddings)
                       if source.position_embeddings is not None else None)
        else:
            new_ids = compact_position_ids(source, keep_visual, plan.index)
            new_emb = self.parts.rotary(hidden, new_ids)
        if s == 0:
            call.base_hidden, call.pruned = hidden, True
        removed = [r + c - k for r, c, k in zip(source.removed, source.counts, keep_counts)]
        self._record_stage(call, cache, plan.full_index, removed)
        b, n_new = plan.valid.shape
        padding = None if plan.all_valid else plan.valid
        return StageInputs(
            start_layer=i,
            valid=plan.valid,
            attention_mask=causal_padding_mask(self.parts.text_config, padding, b, n_new, n_new, hidden.dtype,
                                               hidden.device),
            position_ids=new_ids,
            position_embeddings=new_emb,  # type: ignore[arg-type]
            gather_index=plan.index,
            replacement=replacement,
            full_index=plan.full_index,
            counts=keep_counts,
            all_valid=plan.all_valid,
        )

    def _first_source(self, call: CallState, hidden: torch.Tensor, kwargs: dict[str, Any]) -> StageSource:
        """The first stage selects from the full sequence, as the layer receives it."""
        assert call.visual is not None
        b, length = hidden.shape[:2]
        mask = call.attention_mask
        if call.all_valid or mask is None:
            valid = self._all_true(hidden.device, b, length)
        else:
            valid = mask[:, -length:].bool()
        return StageSource(valid=valid, visual=call.visual, counts=call.n_visual, full_index=None,
                           all_valid=call.all_valid, position_ids=kwargs.get("position_ids"),
                           position_embeddings=kwargs.get("position_embeddings"), layer_kwargs=kwargs,
                           removed=[0] * b)

    def _select(self, s: int, i: int, source: StageSource, hidden: torch.Tensor, keep_counts: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run stage ``s``'s selector: the (B, S) kept-visual mask, and replacement hidden states
        when the selector returns some (merging selectors)."""
        query_positions, query_positions_host = self._proxy_positions(source.valid, source.all_valid, self.windows[s])
        request = SelectionRequest(
            probe_inputs=ProbeInputs(
                hidden=hidden,
                valid=source.valid,
                query_positions=query_positions,
                layer_kwargs=source.layer_kwargs,
                position_embeddings=source.position_embeddings,
                query_positions_host=query_positions_host,
                all_valid=source.all_valid,
            ),
            probe_modules=ProbeModules(self.parts.layers[i], self.parts.norm, self.parts.head),
            candidates=source.visual,
            budgets=torch.tensor(keep_counts, device=hidden.device),
            config=self.config,
            probe=self.probes[s] if source.position_embeddings is not None else "full",
            candidate_counts=list(source.counts),
            budget_counts=keep_counts,
        )
        chosen = self.selectors[s](request)
        return chosen if isinstance(chosen, tuple) else (chosen, None)

    def _all_true(self, device: torch.device, b: int, length: int) -> torch.Tensor:
        """A (B, length) all-True mask as a view of one cached element (no kernel per call)."""
        key = str(device)
        if key not in self._true:
            self._true[key] = torch.ones((), dtype=torch.bool, device=device)
        return self._true[key].expand(b, length)

    def _proxy_positions(self, valid: torch.Tensor, all_valid: bool, window: ProxyWindow
                         ) -> tuple[torch.Tensor, np.ndarray | None]:
        """(B, K) proxy positions, and their host copy when every token is real (then they follow
        from the length alone and are built on the host: one copy instead of a dozen small ops)."""
        if not all_valid:
            return proxy_query_positions(valid, window.tokens, window.includes_last), None
        b, length = valid.shape
        end = length - 1 if window.includes_last else length - 2
        row = np.maximum(np.arange(end - window.tokens + 1, end + 1), 0)
        host = np.repeat(row[None, :], b, axis=0)
        return torch.from_numpy(host).to(valid.device), host
