"""Index bookkeeping: from a keep mask to gathers of the shortened sequence and back."""

from __future__ import annotations

import torch

from ..tensor_ops import gather_position_ids, gather_tokens

__all__ = ["gather_position_ids", "gather_tokens", "keep_index", "scatter_back"]


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


def scatter_back(base: torch.Tensor, out: torch.Tensor, full_index: torch.Tensor, no_filler: bool = False
                 ) -> torch.Tensor:
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
