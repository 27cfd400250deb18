"""State of one forward call, and what a KV cache's pruned layers hold across calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StageCache:
    """What the layers of one prune stage hold in a KV cache.

    Attributes:
        full_index: (B, P) long, for each cached slot its position in the full sequence
            (the one the unpruned layers see); -1 for filler slots.
        removed: per row, visual tokens dropped up to this stage (for compact positions).
    """

    full_index: torch.Tensor
    removed: list[int]


@dataclass
class CacheRecord:
    """Attached (weakly) to a cache object whose prefill was pruned.

    Attributes:
        full_len: tokens the unpruned layers hold.
        stages: one entry per prune stage.
    """

    full_len: int
    stages: list[StageCache]


@dataclass
class StageInputs:
    """What every layer of one stage receives in this call (replacing the model's own).

    Attributes:
        start_layer: first decoder layer of the stage.
        valid: (B, S) bool, real tokens of the stage's sequence in this call (queries).
        attention_mask: the backend-specific mask for the stage's layers.
        position_ids: position ids of the stage's queries, or None to leave them.
        position_embeddings: (cos, sin) of the stage's queries, or None to leave them.
        gather_index: (B, S) long into the previous space; set only when this call prunes
            here, so the stage's first layer shortens the hidden states.
        replacement: (B, S_prev, D) hidden states to gather from instead of the layer's input,
            when the selector returned some (merging selectors).
        full_index: (B, S) long positions in the full sequence (-1 filler), for a pruning call.
        counts: per row, visual tokens in the stage's sequence, for a pruning call.
        all_valid: every slot of the stage's sequence is a real token (no padding, no filler).
    """

    start_layer: int
    valid: torch.Tensor
    attention_mask: Any
    position_ids: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    gather_index: torch.Tensor | None = None
    replacement: torch.Tensor | None = None
    full_index: torch.Tensor | None = None
    counts: list[int] | None = None
    all_valid: bool = False


@dataclass
class CallState:
    """Per forward call of the VLM (held in a ContextVar: threads never share it).

    Attributes:
        visual: (B, L) bool, visual placeholder positions of this call's input_ids, or None.
        n_visual: per row, the number of visual tokens (read once on the host).
        attention_mask: the 2-D mask the caller passed (B, past + L), or None.
        q_len: tokens in this call.
        all_valid: no padding among this call's tokens (known on the host).
        stages: per stage index, what its layers get; ``None`` marks a stage that stays as is.
        base_hidden: (B, L, D) hidden states entering the first prune layer (pruning calls).
        cache: the KV cache object the layers use, once seen.
        record: the cache's record, created or extended by this call.
        layer: the hooked decoder layer that ran last in this call (None before the first).
    """

    visual: torch.Tensor | None
    n_visual: list[int]
    attention_mask: torch.Tensor | None
    q_len: int
    all_valid: bool = True
    stages: dict[int, StageInputs | None] = field(default_factory=dict)
    base_hidden: torch.Tensor | None = None
    cache: Any = None
    record: CacheRecord | None = None
    pruned: bool = False
    layer: int | None = None
