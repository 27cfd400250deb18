"""Greedy cosine-similarity NMS to a fixed budget, batched on the tensors' device.

The authors walk the saliency order in a Python loop over a NumPy copy. Here the greedy result
is computed as the unique fixed point of

    keep[i] = candidate[i] and not any(keep[j] and sim[j, i] >= tau for j before i)

(order = saliency descending), by Jacobi iteration from ``keep = candidate``: each round is one
batched ``candidate - keep @ suppress`` (a ``baddbmm``) and a clamp. The map is antitone, so
iterates alternate between upper bounds (even rounds) and lower bounds (odd rounds) of the
answer; two consecutive iterates that agree are the answer. After round r the first r positions
are final, and in practice the walk is stable after a handful of rounds, so a few rounds run
before the one device-to-host read that checks them (more follow only if it fails).

Only a prefix of the saliency order is examined first: whether position i survives depends
only on the positions before it, so if the first ``M`` positions already hold ``budget``
survivors in every row, the walk's answer lies inside them and the rest need no similarity
matrix at all. Otherwise the prefix doubles (up to all ``N``). Exact either way. The first
prefix is twice the budget: the (M, M) similarity is the NMS's main cost (at 4,096 tokens and
budget 455, M = 910 instead of 4,096: 20x less), and starting small costs at most one more
host read per doubling when suppression removes more than half of the prefix. The same read tells both
whether the rounds have converged and whether the prefix held enough survivors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FIRST_ROUNDS = 3  # odd: the checked pair is (upper bound, lower bound)


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


def suppression_matrix(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, M, D) features in priority order -> (B, M, M) fp32, 1 at [b, j, i] when j comes
    before i and their cosine similarity is >= threshold (j suppresses i if j is kept)."""
    unit = F.normalize(features.float(), dim=-1)
    return (unit @ unit.transpose(1, 2)).ge_(threshold).triu_(1)


def jacobi_rounds(start: torch.Tensor, suppress: torch.Tensor, keep: torch.Tensor, rounds: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rounds`` rounds of ``keep <- max(start - keep @ suppress, 0)``.

    Args:
        start: (B, 1, M) fp32 0/1, the candidates (round 0).
        suppress: (B, M, M) from :func:`suppression_matrix`.
        keep: (B, 1, M) the iterate to continue from.
    Returns:
        The last two iterates (previous, last), each (B, 1, M) fp32 0/1 (sums of 0/1 products
        are exact integers in fp32).
    """
    previous = keep
    for _ in range(rounds):
        previous, keep = keep, torch.baddbmm(start, keep, suppress, alpha=-1.0).clamp_min_(0.0)
    return previous, keep


def greedy_nms_keep(features: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """The full greedy walk over tokens already sorted by priority (no budget).

    Args:
        features: (B, N, D) token features in priority order.
        candidates: (B, N) bool, which tokens take part (in the same order).
        threshold: a token is suppressed by an earlier kept token when their cosine
            similarity is >= threshold.
    Returns:
        (B, N) bool: tokens the full greedy walk keeps.
    """
    suppress = suppression_matrix(features, threshold)
    start = candidates.float().unsqueeze(1)
    previous, keep = jacobi_rounds(start, suppress, start, 1)
    while not torch.equal(previous, keep):
        previous, keep = jacobi_rounds(start, suppress, keep, 1)
    return keep.squeeze(1).bool()


def _walk_to_budget(
    features: torch.Tensor,
    order: torch.Tensor,
    candidates: torch.Tensor,
    uniform: bool,
    budgets: torch.Tensor,
    m: int,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The greedy walk on the first ``m`` positions of the order, run until it settles.

    Returns:
        start: (B, 1, m) fp32 candidates in order; keep: (B, 1, m) fp32 survivors;
        short: whether some row has fewer than its budget survivors in the prefix.
    """
    n = order.shape[1]
    prefix = order[:, :m]
    if uniform:  # every row has exactly n candidates: they are the first n of the order
        start = features.new_ones(order.shape[0], 1, m, dtype=torch.float32)
    else:
        start = candidates.gather(1, prefix).unsqueeze(1).float()
    suppress = suppression_matrix(features.gather(1, prefix.unsqueeze(-1).expand(-1, -1, features.shape[-1])),
                                  threshold)
    previous, keep = jacobi_rounds(start, suppress, start, FIRST_ROUNDS)
    while True:
        survivors = keep.sum(-1)  # (B, 1); keep is the lower bound
        unsettled, short = torch.stack(((previous - keep).sum(), (budgets - survivors).clamp_min(0).sum())).tolist()
        if unsettled == 0 and (short == 0 or m == n):
            return start, keep, short > 0
        if unsettled == 0:  # the prefix was too short for some row: a longer one, from scratch
            return _walk_to_budget(features, order, candidates, uniform, budgets, min(n, 2 * m), threshold)
        previous, keep = jacobi_rounds(start, suppress, keep, 2)


def select_with_nms(
    saliency: torch.Tensor,
    features: torch.Tensor,
    candidates: torch.Tensor,
    budgets: torch.Tensor,
    threshold: float | None,
    candidate_counts: list[int] | None = None,
    budget_counts: list[int] | None = None,
    first_prefix: int | None = None,
) -> torch.Tensor:
    """PIO-FVLM step 2 for a whole batch: reorder by saliency, NMS, stop at the budget, fill.

    Args:
        saliency: (B, N) saliency of every position (only candidates matter).
        features: (B, N, D) hidden states used for cosine similarity.
        candidates: (B, N) bool, the visual tokens of each sample.
        budgets: (B,) long, tokens to keep per sample (<= number of candidates).
        threshold: NMS threshold; ``None`` = no NMS (top-k by saliency).
        candidate_counts, budget_counts: per row, the number of candidates and ``budgets``, when
            the caller knows them on the host (each spares a device-to-host read).
        first_prefix: positions of the saliency order examined first (default: 2 x the
            largest budget); the answer does not depend on it.
    Returns:
        (B, N) bool mask of the selected tokens, in the original positions, exactly
        ``budgets[b]`` per row.
    """
    counts = candidates.sum(1).tolist() if candidate_counts is None else candidate_counts
    n = max(counts)
    uniform = min(counts) == n
    order = saliency_order(saliency, candidates)[:, :n]  # candidates come first
    budget = budgets.to(device=order.device, dtype=torch.float32).view(-1, 1, 1)
    if threshold is None:
        start = candidates.gather(1, order).unsqueeze(1).float()
        keep, short = start, False
    else:
        if first_prefix is None:
            first_prefix = 2 * (int(budgets.max()) if budget_counts is None else max(budget_counts))
        m = max(1, min(n, first_prefix))
        start, keep, short = _walk_to_budget(features, order, candidates, uniform, budget, m, float(threshold))
    # The walk stops once `budget` tokens are selected: keep the first `budget` survivors.
    chosen = keep * (keep.cumsum(-1) <= budget)
    if short and keep.shape[-1] == n:
        # Everything suppressed before the budget was reached: fill with the most salient rest.
        rest = start - chosen  # start and keep cover the same (whole) prefix
        missing = budget - chosen.sum(-1, keepdim=True)
        chosen = chosen + rest * (rest.cumsum(-1) <= missing)
    m = chosen.shape[-1]
    return torch.zeros_like(candidates).scatter_(1, order[:, :m], chosen.squeeze(1).bool())
