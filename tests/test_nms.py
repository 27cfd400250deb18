"""The batched, on-device NMS equals a naive greedy loop."""

import pytest
import torch

from pio_fvlm.select.nms import select_with_nms
from reference import naive_nms


def _check(saliency, features, candidates, budgets, threshold):
    got = select_with_nms(saliency, features, candidates, torch.tensor(budgets), threshold)
    # the runtime passes the counts it knows on the host: same answer
    counts = candidates.sum(1).tolist()
    with_host_counts = select_with_nms(saliency, features, candidates, torch.tensor(budgets), threshold,
                                       candidate_counts=counts, budget_counts=list(budgets))
    assert torch.equal(got, with_host_counts)
    for b in range(saliency.shape[0]):
        want = naive_nms(saliency[b], features[b], candidates[b], budgets[b], threshold)
        assert got[b].nonzero().flatten().tolist() == want, f"row {b}"
        assert int(got[b].sum()) == budgets[b]
        assert not (got[b] & ~candidates[b]).any()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.8, 0.3, 0.0, None])
def test_random(seed, threshold):
    g = torch.Generator().manual_seed(seed)
    b, n, d = 3, 40, 8
    # clustered features, so that suppression really happens
    centers = torch.randn(b, 5, d, generator=g)
    features = centers[:, torch.randint(0, 5, (n,), generator=g)] + 0.3 * torch.randn(b, n, d, generator=g)
    saliency = torch.rand(b, n, generator=g)
    candidates = torch.rand(b, n, generator=g) < 0.8
    budgets = [min(int(candidates[i].sum()), k) for i, k in enumerate([5, 12, 30])]
    _check(saliency, features, candidates, budgets, threshold)


def test_ties_in_saliency():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 20, 6, generator=g)
    saliency = torch.tensor([[1.0, 2.0] * 10, [0.5] * 20])  # many exact ties
    candidates = torch.ones(2, 20, dtype=torch.bool)
    _check(saliency, features, candidates, [7, 7], 0.8)


def test_identical_tokens_all_suppressed_then_fill():
    features = torch.ones(1, 10, 4)  # all identical: the first selected suppresses the rest
    saliency = torch.arange(10.0).unsqueeze(0)
    candidates = torch.ones(1, 10, dtype=torch.bool)
    got = select_with_nms(saliency, features, candidates, torch.tensor([4]), 0.8)
    # NMS keeps only the most salient (9); the fill adds the next most salient: 8, 7, 6
    assert got[0].nonzero().flatten().tolist() == [6, 7, 8, 9]
    _check(saliency, features, candidates, [4], 0.8)


def test_chain_of_suppressions():
    # token i is similar only to i+1: greedy keeps 0, 2, 4, ... (a long dependency chain)
    n = 12  # angles stay below 2*pi: no wrap-around similarity
    angles = torch.arange(n) * 0.5  # neighbours at cos(0.5)=0.88 >= 0.8, next-but-one 0.54
    features = torch.stack([angles.cos(), angles.sin()], -1).unsqueeze(0)
    saliency = torch.linspace(1, 0, n).unsqueeze(0)
    candidates = torch.ones(1, n, dtype=torch.bool)
    got = select_with_nms(saliency, features, candidates, torch.tensor([6]), 0.8)
    assert got[0].nonzero().flatten().tolist() == list(range(0, n, 2))
    _check(saliency, features, candidates, [6], 0.8)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_similarity_exactly_at_the_threshold_suppresses(threshold):
    """>= threshold suppresses (the authors' rule): at tau = 0, an orthogonal token (cosine exactly 0);
    at tau = 1, a copy (cosine exactly 1). A '>' would keep the second token instead of the third."""
    second = [0.0, 1.0] if threshold == 0.0 else [2.0, 0.0]
    features = torch.tensor([[[1.0, 0.0], second, [-1.0, 0.0]]])
    saliency = torch.tensor([[3.0, 2.0, 1.0]])
    candidates = torch.ones(1, 3, dtype=torch.bool)
    got = select_with_nms(saliency, features, candidates, torch.tensor([2]), threshold)
    assert got[0].nonzero().flatten().tolist() == [0, 2]
    _check(saliency, features, candidates, [2], threshold)


def test_budget_equals_candidates_and_single():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 9, 4, generator=g)
    saliency = torch.rand(2, 9, generator=g)
    candidates = torch.tensor([[True] * 9, [False] * 8 + [True]])
    _check(saliency, features, candidates, [9, 1], 0.8)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.95, 0.6, 0.2])
@pytest.mark.parametrize("first_prefix", [1, 8, 40])
def test_prefix_walk_equals_full_walk(seed, threshold, first_prefix):
    """The budget is settled inside a prefix (or the prefix grows): same selection as the full walk,
    including rows where suppression is heavy enough to need the whole order and the fill."""
    from pio_fvlm.select.nms import greedy_nms_keep, saliency_order

    g = torch.Generator().manual_seed(seed)
    b, n, d = 3, 120, 6
    centers = torch.randn(b, 4, d, generator=g)
    features = centers[:, torch.randint(0, 4, (n,), generator=g)] + 0.4 * torch.randn(b, n, d, generator=g)
    saliency = torch.rand(b, n, generator=g)
    candidates = torch.rand(b, n, generator=g) < 0.9
    budgets = torch.tensor([3, 10, 25])
    order = saliency_order(saliency, candidates)
    cand_sorted = candidates.gather(1, order)
    feats_sorted = features.gather(1, order.unsqueeze(-1).expand(-1, -1, d))
    full = greedy_nms_keep(feats_sorted, cand_sorted, threshold)
    got = select_with_nms(saliency, features, candidates, budgets, threshold, first_prefix=first_prefix)
    for row in range(b):
        k = int(budgets[row])
        want = order[row][full[row]][:k]
        if len(want) == k:  # the walk reached the budget: exactly its first k survivors
            assert got[row].nonzero().flatten().tolist() == sorted(want.tolist())
        else:  # all survivors, then the fill
            assert set(want.tolist()) <= set(got[row].nonzero().flatten().tolist())
    _check(saliency, features, candidates, budgets.tolist(), threshold)


def test_identical_tokens_in_a_row_with_fewer_candidates_fill_from_its_own_candidates():
    """The fill after total suppression takes only the row's candidates, also when another row of
    the batch has more (the rows' walks then cover non-candidate slots)."""
    features = torch.ones(2, 10, 4)
    saliency = torch.arange(10.0).repeat(2, 1)
    candidates = torch.ones(2, 10, dtype=torch.bool)
    candidates[1, 5:] = False
    got = select_with_nms(saliency, features, candidates, torch.tensor([4, 3]), 0.8)
    assert got[1].nonzero().flatten().tolist() == [2, 3, 4]
    _check(saliency, features, candidates, [4, 3], 0.8)


def test_a_prefix_that_holds_the_budget_is_walked_once_with_one_host_read(monkeypatch):
    """The usual case: the first prefix (2 x the budget) holds the budget in every row, so no
    longer prefix is built, the walk reports no shortfall and the device is read once."""
    from pio_fvlm.measure import OpStats
    from pio_fvlm.select import nms

    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 64, 16, generator=g)  # random directions: nothing is that similar
    saliency = torch.rand(2, 64, generator=g)
    candidates = torch.ones(2, 64, dtype=torch.bool)
    walked = []
    build = nms.suppression_matrix
    monkeypatch.setattr(nms, "suppression_matrix", lambda f, tau: walked.append(f.shape[1]) or build(f, tau))
    with OpStats() as stats:
        got = nms.select_with_nms(saliency, features, candidates, torch.tensor([8, 8]), 0.9,
                                  candidate_counts=[64, 64], budget_counts=[8, 8])
    assert walked == [16] and stats.syncs == 1 and got.sum(1).tolist() == [8, 8]
    order = nms.saliency_order(saliency, candidates)
    budget = torch.tensor([8.0, 8.0]).view(-1, 1, 1)
    _, keep, short = nms._walk_to_budget(features, order, candidates, True, budget, 16, 0.9)
    assert not short and keep.sum(-1).min() >= 8
    _check(saliency, features, candidates, [8, 8], 0.9)
