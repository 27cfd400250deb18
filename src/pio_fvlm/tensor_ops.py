"""Small gathers shared by the selection core and the runtime."""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B or 1, S, D...) -> (B, S_new, D...) along dim 1."""
    b = index.shape[0]
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def gather_position_ids(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(..., B or 1, S) -> (..., B, S_new) along the last axis (covers 2-D and M-RoPE ids)."""
    lead = pos.shape[:-2]
    b, s_new = index.shape
    pos = pos.expand(*lead, b, pos.shape[-1])
    return pos.gather(-1, index.expand(*lead, b, s_new))
