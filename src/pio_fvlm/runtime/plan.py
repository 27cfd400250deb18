"""A stage's plan: which tokens of the sequence it receives survive, and the index bookkeeping
from a keep mask to gathers of the shortened sequence and back to full length."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..tensor_ops import gather_position_ids, gather_tokens

__all__ = ["StagePlan", "StageSource", "compact_position_ids", "gather_position_ids", "gather_tokens", "keep_index",
           "plan_stage", "scatter_back"]


@dataclass
class StageSource:
    """The sequence a pruning stage selects from (what its first layer receives).

    Attributes:
        valid: (B, S) bool, real tokens (False for padding and filler slots).
        visual: (B, S) bool, the visual tokens (the candidates).
        counts: per row, visual tokens in the sequence.
        full_index: (B, S) long positions in the full sequence (-1 for filler), or None when the
            sequence is the full one (the first stage).
        all_valid: every slot is a real token (known on the host).
        position_ids, position_embeddings: the ones its layers receive (None if they take none).
        layer_kwargs: everything the stage's first layer receives, for the generic probe.
        removed: per row, visual tokens dropped before this stage.
    """

    valid: torch.Tensor
    visual: torch.Tensor
    counts: list[int]
    full_index: torch.Tensor | None
    all_valid: bool
    position_ids: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    layer_kwargs: dict[str, Any]
    removed: list[int]


@dataclass
class StagePlan:
    """The shortened sequence of a stage.

    Attributes:
        index: (B, S_new) long into the source sequence, kept tokens in order (0 at filler slots).
        valid: (B, S_new) bool, real tokens.
        full_index: (B, S_new) long positions in the full sequence, -1 at filler slots.
        all_valid: no padding and no filler (every row keeps as many tokens).
    """

    index: torch.Tensor
    valid: torch.Tensor
    full_index: torch.Tensor
    all_valid: bool


def plan_stage(source: StageSource, keep_visual: torch.Tensor, keep_counts: list[int],
               all_true: Callable[[torch.device, int, int], torch.Tensor]) -> StagePlan:
    """Text plus the kept visual tokens of each row, in order, right-aligned when rows differ.

    Args:
        keep_visual: (B, S) bool, the selector's choice (``keep_counts[b]`` in row b).
        all_true: ``(device, B, length) -> (B, length)`` all-True mask without a kernel.
    """
    length = source.visual.shape[1]
    new_counts = [length - c + k for c, k in zip(source.counts, keep_counts)]
    dropped = source.visual & ~keep_visual
    if min(new_counts) == max(new_counts):  # every row keeps as many tokens: one sort, no filler
        index = torch.sort(dropped, dim=1, stable=True).indices[:, : new_counts[0]]
        valid = all_true(index.device, *index.shape) if source.all_valid else source.valid.gather(1, index)
        full = index if source.full_index is None else source.full_index.gather(1, index)
        return StagePlan(index, valid, full, source.all_valid)
    index, slot_valid = keep_index(~dropped, new_counts)
    full = index if source.full_index is None else source.full_index.gather(1, index)
    return StagePlan(index, source.valid.gather(1, index) & slot_valid, full.masked_fill(~slot_valid, -1), False)


def compact_position_ids(source: StageSource, keep_visual: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """positions="compact": the kept tokens renumbered contiguously (each moves back by the visual
    tokens dropped before it), gathered to the shortened sequence."""
    pos_ids = source.position_ids
    if pos_ids is None:
        raise ValueError("positions='compact' needs position_ids in the decoder layers' inputs")
    b, length = source.visual.shape
    before = (source.visual & ~keep_visual).long().cumsum(1)  # dropped tokens up to each position
    return gather_position_ids(pos_ids.expand(*pos_ids.shape[:-2], b, length) - before, index)


def keep_index(keep: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the kept tokens of each row, in order, right-aligned (filler on the left).

    Args:
        keep: (B, S) bool.
        counts: per row, the number of True entries (known on the host, so no sync here).
    Returns:
        index: (B, S_new) long into the S positions (0 at filler slots), S_new = max(counts).
        slot_valid: (B, S_new) bool, False at filler slots.
    """
    s_new = max(counts)
    # Kept positions first (in order), dropped ones after: a stable sort on a 0/1 key.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    fill = s_new - torch.tensor(counts, device=keep.device)
    slot = torch.arange(s_new, device=keep.device).unsqueeze(0) - fill.unsqueeze(1)  # (B, S_new)
    slot_valid = slot >= 0
    index = order.gather(1, slot.clamp(min=0))
    return index.masked_fill(~slot_valid, 0), slot_valid


def scatter_back(base: torch.Tensor, out: torch.Tensor, full_index: torch.Tensor, no_filler: bool) -> torch.Tensor:
    """Put the pruned layers' output back at full length.

    Args:
        base: (B, L, D) hidden states at the prune point (fill for dropped positions).
        out: (B, S, D) output of the last layer on the shortened sequence.
        full_index: (B, S) long positions in the full sequence, -1 at filler slots.
        no_filler: the caller knows that ``full_index`` holds no -1 (then one scatter does it).
    Returns:
        (B, L, D).
    """
    b, length, d = base.shape
    if no_filler:
        return base.to(out.dtype).scatter(1, full_index.unsqueeze(-1).expand(-1, -1, d), out)
    ext = torch.cat([base.to(out.dtype), out.new_zeros(b, 1, d)], dim=1)
    idx = torch.where(full_index < 0, length, full_index)
    ext.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, d), out)
    return ext[:, :length]
