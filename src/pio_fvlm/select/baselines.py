"""Other ways to choose visual tokens, behind the same selector interface, for comparisons.

    pio_fvlm.wrap(model, budget=64, selector=UniformSelector())
    pio_fvlm.wrap(model, budget=64, layer=2, selector=FastVSelector())   # FastV prunes after layer 2

Every selector returns a (B, S) bool mask with exactly ``budgets[b]`` candidates in row b;
:class:`PoolingSelector` also returns replacement hidden states (the kept token of each pooling
window carries the window's mean). All of them run inside the language model at the prune
layer, like PIO-FVLM, so that a comparison differs only in the choice.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..tensor_ops import attention_probs, gather_tokens
from .nms import select_with_nms
from .saliency import rotated_queries_keys
from .selector import ProxyWindow, SelectionRequest


def _rank(candidates: torch.Tensor) -> torch.Tensor:
    """(B, S) index of each candidate among its row's candidates (garbage elsewhere)."""
    return candidates.long().cumsum(1) - 1


def _top(score: torch.Tensor, request: SelectionRequest) -> torch.Tensor:
    return select_with_nms(score, request.probe_inputs.hidden, request.candidates, request.budgets, None)


def top_by_visual_score(request: SelectionRequest, scores: list[torch.Tensor]) -> torch.Tensor:
    """Keep each row's ``budgets[b]`` highest-scored candidates, the scores given per visual token.

    Args:
        scores: one (n_b,) tensor per row, n_b = that row's candidate count, in sequence order
            (for diagnostics and tests that know which image tokens they want).
    Returns:
        (B, S) bool keep mask.
    """
    cand = request.candidates
    score = torch.full(cand.shape, float("-inf"))
    for row, row_scores in enumerate(scores):
        score[row, cand[row]] = row_scores.float()
    return _top(score, request)


class RandomSelector:
    """Uniformly random visual tokens, seeded. The draw is indexed by a token's rank among its
    row's visual tokens, so a sample gets the same choice alone, in a batch, or recomputed."""

    first_layer = 0  # reads no hidden states: may prune before layer 0

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, request: SelectionRequest) -> torch.Tensor:
        cand = request.candidates
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        draw = torch.rand(cand.shape[1], generator=g).to(cand.device)
        score = draw[_rank(cand).clamp(min=0)]
        return _top(score, request)


class UniformSelector:
    """Evenly spaced visual tokens (in sequence order, i.e. raster order within an image).
    ``wrap(model, budget=64, layer=0, selector=UniformSelector())`` is the benchmark's ideal bound:
    every decoder layer runs on the text and 64 visual tokens, chosen at no cost."""

    first_layer = 0  # reads no hidden states: may prune before layer 0

    def __call__(self, request: SelectionRequest) -> torch.Tensor:
        cand = request.candidates
        n = cand.long().sum(1, keepdim=True)
        k = request.budgets.to(cand.device).unsqueeze(1)
        rank = _rank(cand)
        # k equal buckets of ranks; the centre of each bucket is chosen (exactly k in all)
        bucket = rank * k // n
        centre = ((2 * bucket + 1) * n) // (2 * k)
        return _top((rank == centre).float(), request)


class PoolingSelector:
    """Plain spatial average pooling of each image's square token grid.

    The image's ``side x side`` grid is cut into ``g x g`` tiles (``g = floor(sqrt(k))`` for a
    per-image budget k); each tile's centre token is kept and carries the tile's mean hidden
    state. Budget left over after the ``g * g`` tiles is filled with evenly spaced tokens.
    Needs square per-image grids of ``tokens_per_image`` tokens (LLaVA-1.5: 576).
    """

    def __init__(self, tokens_per_image: int = 576) -> None:
        side = math.isqrt(tokens_per_image)
        if side * side != tokens_per_image:
            raise ValueError(f"PoolingSelector needs a square token grid per image; got {tokens_per_image} tokens")
        self.n, self.side = tokens_per_image, side

    def __call__(self, request: SelectionRequest) -> tuple[torch.Tensor, torch.Tensor]:
        cand, hidden = request.candidates, request.probe_inputs.hidden
        keep = torch.zeros_like(cand)
        new_hidden = hidden.clone()
        for b in range(cand.shape[0]):
            pos = cand[b].nonzero().flatten()
            if pos.numel() % self.n:
                raise ValueError(
                    f"PoolingSelector: a sample holds {pos.numel()} visual tokens, not a multiple of "
                    f"{self.n} per image; it suits LLaVA-1.5-style fixed grids only"
                )
            images = pos.numel() // self.n
            budget = int(request.budgets[b])
            per_image = [budget // images + (1 if j < budget % images else 0) for j in range(images)]
            for j, k in enumerate(per_image):
                grid = pos[j * self.n : (j + 1) * self.n].view(self.side, self.side)
                g = max(1, math.isqrt(k))
                edges = [round(t * self.side / g) for t in range(g + 1)]
                chosen = []
                for r in range(g):
                    for c in range(g):
                        tile = grid[edges[r] : edges[r + 1], edges[c] : edges[c + 1]].flatten()
                        centre = grid[(edges[r] + edges[r + 1]) // 2, (edges[c] + edges[c + 1]) // 2]
                        new_hidden[b, centre] = hidden[b, tile].mean(0)
                        chosen.append(int(centre))
                rest = [int(p) for p in grid.flatten() if int(p) not in set(chosen)]
                extra = k - len(chosen)
                chosen += [rest[round(t * len(rest) / extra)] for t in range(extra)] if extra > 0 else []
                keep[b, chosen] = True
        return keep, new_hidden


def attention_rows(attn: Any, xn: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A Llama-style attention layer's weights for a few query rows, recomputed from its own
    projections and rotary (any attention backend: the fused ones return no weights).

    Args:
        attn: the layer's ``self_attn`` (q_proj, k_proj, head_dim, scaling, num_key_value_groups;
            q_norm / k_norm when it has them).
        xn: (B, S, D) the attention's input (after the layer's input norm).
        position_embeddings: (cos, sin), each (B or 1, S, hd).
        rows: (B, P) the query positions.
        allowed: (B, P or 1, S) bool, the keys each query may see.
    Returns: (B, H, P, S) float attention weights.
    """
    q, k = rotated_queries_keys(attn, xn, rows, *position_embeddings)  # (B, P, H, hd), (B, S, Hkv, hd)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=2)
    return attention_probs(q.transpose(1, 2), k.transpose(1, 2), attn.scaling, allowed.unsqueeze(1))


class FastVSelector:
    """FastV: the attention the last prompt token pays to each visual token, averaged over
    heads, at the prune layer (FastV prunes after layer 2: use ``wrap(..., layer=2)``).

    The attention row is computed here from the layer's own projections (one query), so it
    works with every attention backend; FastV itself needs eager attention to read the map.
    """

    proxy = ProxyWindow(tokens=1, includes_last=True)  # the runtime hands over the last prompt position

    def __call__(self, request: SelectionRequest) -> torch.Tensor:
        inp = request.probe_inputs
        layer: Any = request.probe_modules.layer
        attn: Any = getattr(layer, "self_attn", None)
        if attn is None or inp.position_embeddings is None:
            raise ValueError("FastVSelector needs a Llama-style attention layer with rotary position embeddings")
        b, s, _ = inp.hidden.shape
        last = inp.query_positions[:, -1:]
        probs = attention_rows(attn, layer.input_layernorm(inp.hidden), inp.position_embeddings,
                               last, inp.valid.view(b, 1, s))
        return _top(probs.mean(1).squeeze(1), request)  # heads averaged: (B, S)


class DartSelector:
    """DART-style duplication-aware choice: a few pivot tokens (largest hidden-state norm),
    then the tokens least similar to any pivot (cosine of hidden states)."""

    def __init__(self, pivots: int = 4) -> None:
        self.pivots = pivots

    def __call__(self, request: SelectionRequest) -> torch.Tensor:
        cand, hidden = request.candidates, request.probe_inputs.hidden.float()
        norm = hidden.norm(dim=-1).masked_fill(~cand, float("-inf"))
        n_piv = min(self.pivots, int(request.budgets.min()))
        piv = norm.topk(n_piv, dim=1).indices  # (B, P)
        unit = F.normalize(hidden, dim=-1)
        sim = unit @ gather_tokens(unit, piv).transpose(1, 2)  # (B, S, P)
        score = -sim.amax(-1)
        score = score.scatter(1, piv, float("inf"))  # pivots first
        return _top(score, request)


BASELINES = {
    "random": RandomSelector,
    "uniform": UniformSelector,
    "pooling": PoolingSelector,
    "fastv": FastVSelector,
    "dart": DartSelector,
}
