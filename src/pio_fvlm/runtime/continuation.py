"""The cache records: what a pruned prefill leaves in a KV cache, and the calls that continue it.

A stage that prunes in a prefill records, per cache object, which full positions its layers'
cache slots hold. A later call with that cache (a decode step, a continued prompt) keeps all
its tokens; its stage layers get a mask built from the record, so keys line up with the short
cache, and the record grows by the call's tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from .call_start import CallStart
from .masks import causal_padding_mask
from .state import CacheRecord, CallState, StageCache, StageInputs


class Continuation(CallStart):
    """The runtime's step that continues pruned caches (see the module's docstring)."""

    def _record_stage(self, call: CallState, cache: Any, full_index: torch.Tensor, removed: list[int]) -> None:
        """Remember which full positions this stage's cache slots hold (for later calls)."""
        if cache is None:
            return
        if call.record is None:
            call.record = CacheRecord(full_len=call.q_len, stages=[])
            with self._lock:
                self._records[cache] = call.record
        call.record.stages.append(StageCache(full_index=full_index, removed=removed))

    def _continue_stage(
        self, call: CallState, record: CacheRecord, s: int, i: int, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> StageInputs:
        """A call after a pruned prefill: its tokens are all kept; keys follow the record."""
        call.record = record
        sc = record.stages[s]
        b, q = hidden.shape[:2]
        past = record.full_len
        if sc.full_index.shape[0] != b:
            raise ValueError(
                f"this KV cache was pruned for a batch of {sc.full_index.shape[0]} but the call has {b} rows; "
                f"start a new cache for a new batch"
            )
        mask = call.attention_mask
        if mask is None:
            full_mask = hidden.new_ones(b, past + q, dtype=torch.bool)
        elif mask.shape[1] != past + q:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns but the cache holds {past} tokens and the "
                f"call adds {q}: pass the mask of the whole sequence so far ({past + q} columns)"
            )
        else:
            full_mask = mask.bool()
        cached = full_mask.gather(1, sc.full_index.clamp(min=0)) & (sc.full_index >= 0)
        padding = torch.cat([cached, full_mask[:, past:]], dim=1)
        new_positions = torch.arange(past, past + q, device=hidden.device).expand(b, q)
        sc.full_index = torch.cat([sc.full_index, new_positions], dim=1)

        new_ids, new_emb = None, None
        pos_ids = kwargs.get("position_ids")
        if self.config.positions == "compact" and pos_ids is not None:
            new_ids = pos_ids - torch.tensor(sc.removed, device=pos_ids.device).view(b, 1)
            new_emb = self.parts.rotary(hidden, new_ids)
        return StageInputs(
            start_layer=i,
            valid=padding[:, -q:],
            attention_mask=causal_padding_mask(self.parts.text_config, padding, b, q, padding.shape[1], hidden.dtype,
                                               hidden.device),
            position_ids=new_ids,
            position_embeddings=new_emb,
        )
