"""Greedy cosine-similarity NMS to a fixed budget, batched on the tensors' device.

The authors walk the saliency order in a Python loop over a NumPy copy. Here the greedy result
is computed as the unique fixed point of

    keep[i] = candidate[i] and not any(keep[j] and sim[j, i] >= tau for j before i)

(order = saliency descending). Jacobi iteration from ``keep = candidate`` reaches it exactly:
after round r the first r positions are final, and in practice it is stable after a handful
of rounds. Each round is one batched mat-vec over the whole batch; convergence is read back
once per ``rounds_per_check`` rounds (one device-to-host read, typically once per call).

Only a prefix of the saliency order is examined first: whether position i survives depends
only on the positions before it, so if the first ``M`` positions already hold ``budget``
survivors in every row, the walk's answer lies inside them and the rest need no similarity
matrix at all. Otherwise the prefix doubles (up to all ``N``). Exact either way; at budget 64
of 576 the (M, M) similarity is about 5x smaller than (N, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def saliency_order(saliency: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Candidates first, by saliency descending; ties and non-candidates by position.

    Args:
        saliency: (B, N) float.
        candidates: (B, N) bool.
    Returns:
        (B, N) long permutation.
    """
    key = saliency.float().masked_fill(~candidates, float("-inf"))
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def greedy_nms_keep(
    features: torch.Tensor,
    candidates: torch.Tensor,
    threshold: float,
    rounds_per_check: int = 4,
) -> torch.Tensor:
    """Greedy NMS over tokens already sorted by priority.

    Args:
        features: (B, N, D) token features in priority order.
        candidates: (B, N) bool, which tokens take part (in the same order).
        threshold: a token is suppressed by an earlier kept token when their cosine
            similarity is >= threshold.
    Returns:
        (B, N) bool: tokens the full greedy walk keeps (before any budget cut).
    """
    n = features.shape[1]
    unit = F.normalize(features.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # (B, N, N)
    earlier = torch.ones(n, n, dtype=torch.bool, device=features.device).triu(1)  # j < i
    pair_ok = candidates.unsqueeze(2) & candidates.unsqueeze(1)
    suppresses = ((sim >= threshold) & earlier & pair_ok).to(unit.dtype)  # [b, j, i]: j suppresses i
    keep = candidates.clone()
    rounds = 0
    while True:
        for _ in range(rounds_per_check):
            previous = keep
            hit = torch.bmm(previous.to(unit.dtype).unsqueeze(1), suppresses).squeeze(1) > 0
            keep = candidates & ~hit
            rounds += 1
        # A fixed point is the greedy answer (it is unique); after n rounds it is reached anyway.
        if rounds >= n or torch.equal(keep, previous):
            return keep


def prefix_nms_keep(
    features: torch.Tensor,
    order: torch.Tensor,
    cand_sorted: torch.Tensor,
    budgets: torch.Tensor,
    threshold: float,
    first_prefix: int | None = None,
) -> torch.Tensor:
    """:func:`greedy_nms_keep` on the shortest prefix of the order that settles the budget.

    Args:
        features: (B, N, D) in original positions; order: (B, N) saliency order;
        cand_sorted: (B, N) bool candidates in that order; budgets: (B,) long.
        first_prefix: prefix tried first (default ``4 * max(budgets)``).
    Returns:
        (B, N) bool in the order: the greedy walk's survivors within the examined prefix,
        ``False`` after it. The first ``budgets[b]`` survivors equal those of the full walk.
    """
    n = order.shape[1]
    m = min(n, first_prefix or 4 * int(budgets.max()))
    while True:
        idx = order[:, :m].unsqueeze(-1).expand(-1, -1, features.shape[-1])
        keep = greedy_nms_keep(features.gather(1, idx), cand_sorted[:, :m], threshold)
        if m == n:
            return keep
        if bool((keep.sum(1) >= budgets).all()):  # every row's walk ends inside the prefix
            return torch.cat([keep, keep.new_zeros(keep.shape[0], n - m)], dim=1)
        m = min(n, 2 * m)


def select_with_nms(
    saliency: torch.Tensor,
    features: torch.Tensor,
    candidates: torch.Tensor,
    budgets: torch.Tensor,
    threshold: float | None,
) -> torch.Tensor:
    """PIO-FVLM step 2 for a whole batch: reorder by saliency, NMS, stop at the budget, fill.

    Args:
        saliency: (B, N) saliency of every position (only candidates matter).
        features: (B, N, D) hidden states used for cosine similarity.
        candidates: (B, N) bool, the visual tokens of each sample.
        budgets: (B,) long, tokens to keep per sample (<= number of candidates).
        threshold: NMS threshold; ``None`` = no NMS (top-k by saliency).
    Returns:
        (B, N) bool mask of the selected tokens, in the original positions, exactly
        ``budgets[b]`` per row.
    """
    order = saliency_order(saliency, candidates)
    cand_sorted = candidates.gather(1, order)
    budgets = budgets.to(order.device)
    if threshold is None:
        nms_keep = cand_sorted
    else:
        nms_keep = prefix_nms_keep(features, order, cand_sorted, budgets, float(threshold))
    budgets = budgets.unsqueeze(1)
    # The walk stops once `budget` tokens are selected: keep the first `budget` survivors.
    selected = nms_keep & (nms_keep.long().cumsum(1) <= budgets)
    # Everything suppressed before the budget was reached: fill with the most salient rest.
    missing = budgets - selected.long().sum(1, keepdim=True)
    rest = cand_sorted & ~selected
    selected = selected | (rest & (rest.long().cumsum(1) <= missing))
    return torch.zeros_like(candidates).scatter(1, order, selected)
