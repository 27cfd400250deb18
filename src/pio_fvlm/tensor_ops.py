"""Small gathers and the attention-weight softmax shared by the selection core, the encoder
mode and the runtime."""

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


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, scale: float,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention weights from queries and keys that are already projected (and rotated).

    Every place that recomputes an attention map from a layer's projections (the fused
    attention backends return no weights) ends here, each doing its own projection layout.

    Args:
        queries: (..., P, hd).
        keys: (..., S, hd), the same leading dimensions.
        scale: the layer's score scale (usually hd ** -0.5).
        allowed: bool, broadcastable to (..., P, S): the keys each query may see; None = all.
    Returns:
        (..., P, S) fp32 weights, each row summing to one.
    """
    scores = (queries @ keys.transpose(-1, -2)).float() * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1)
