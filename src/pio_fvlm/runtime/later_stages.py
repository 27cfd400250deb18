"""Later stages of a multi-stage schedule: each selects among the survivors of the one before.

A later stage works in the shortened space of the stage before it (its valid mask, positions and
attention mask); a stage whose budget keeps everything left passes those on unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from .continuation import Continuation
from .plan import StageSource
from .state import CallState, StageInputs


class LaterStages(Continuation):
    """The runtime's step that prunes in later stages (see the module's docstring)."""

    def _later_source(self, call: CallState, s: int, kwargs: dict[str, Any], cache: Any) -> StageSource:
        """A later stage selects among the survivors of the one before, in its shortened space."""
        prev = call.stages[s - 1]
        assert prev is not None and prev.full_index is not None and call.visual is not None
        full_index = prev.full_index
        pos_ids = prev.position_ids if prev.position_ids is not None else kwargs.get("position_ids")
        pos_emb = prev.position_embeddings
        if pos_emb is None:
            pos_emb = kwargs.get("position_embeddings")
        layer_kwargs = {**kwargs, "attention_mask": prev.attention_mask}
        if pos_ids is not None:
            layer_kwargs["position_ids"] = pos_ids
        if pos_emb is not None:
            layer_kwargs["position_embeddings"] = pos_emb
        assert call.record is not None or cache is None
        b = full_index.shape[0]
        return StageSource(valid=prev.valid, visual=call.visual.gather(1, full_index.clamp(min=0)) & (full_index >= 0),
                           counts=prev.counts or [], full_index=full_index, all_valid=prev.all_valid,
                           position_ids=pos_ids, position_embeddings=pos_emb, layer_kwargs=layer_kwargs,
                           removed=call.record.stages[-1].removed if call.record is not None else [0] * b)

    def _pass_through(self, call: CallState, s: int, i: int, source: StageSource, hidden: torch.Tensor,
                      kwargs: dict[str, Any], cache: Any) -> StageInputs:
        """A stage whose budget keeps every token left: its layers get what the stage before gave."""
        if s > 0:
            prev = call.stages[s - 1]
            assert prev is not None and prev.full_index is not None
            self._record_stage(call, cache, prev.full_index, source.removed)
            return prev
        b, length = hidden.shape[:2]
        call.base_hidden, call.pruned = hidden, True
        identity = torch.arange(length, device=hidden.device).expand(b, length)
        self._record_stage(call, cache, identity, source.removed)
        return StageInputs(start_layer=i, valid=source.valid, attention_mask=kwargs.get("attention_mask"),
                           position_ids=None, position_embeddings=None, full_index=identity, counts=source.counts,
                           all_valid=source.all_valid)
