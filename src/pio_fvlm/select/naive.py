"""The authors' implementation style, as a selector: for benchmarks, to show what we removed.

Same choice as :class:`PioSelector` (up to float rounding), computed the expensive way: the
probe layer runs with queries for every token, the head runs over the whole sequence, and the
NMS is a Python loop per sample over a host (NumPy) copy.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tensor_ops import gather_tokens
from .saliency import _saliency_from, proxy_loss, run_layer_on
from .selector import SelectionRequest


def _host_nms(saliency: np.ndarray, features: np.ndarray, candidates: np.ndarray, budget: int,
              threshold: float | None) -> list[int]:
    cand = np.nonzero(candidates)[0]
    order = cand[np.argsort(-saliency[cand], kind="stable")]
    unit = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    suppressed = np.zeros(len(saliency), dtype=bool)
    selected: list[int] = []
    for i in order:
        if len(selected) == budget:
            break
        if suppressed[i]:
            continue
        selected.append(int(i))
        if threshold is not None:
            suppressed |= unit @ unit[i] >= threshold
    for i in order:
        if len(selected) == budget:
            break
        if int(i) not in selected:
            selected.append(int(i))
    return selected


class NaiveSelector:
    """Full-sequence probe + per-sample host NMS (the authors' way of computing the same thing)."""

    def __call__(self, request: SelectionRequest) -> torch.Tensor:
        mods, inp = request.probe_modules, request.probe_inputs

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            y = run_layer_on(mods.layer, x, inp.layer_kwargs)
            logits = mods.head(mods.norm(y))  # the whole sequence, as the authors
            return proxy_loss(gather_tokens(logits, inp.query_positions.clone()))

        saliency = _saliency_from(loss_fn, inp.hidden).cpu().numpy()
        features = inp.hidden.float().cpu().numpy()
        candidates = request.candidates.cpu().numpy()
        budgets = request.budgets.tolist()
        keep = torch.zeros_like(request.candidates)
        for b in range(saliency.shape[0]):
            chosen = _host_nms(saliency[b], features[b], candidates[b], budgets[b], request.config.nms_threshold)
            keep[b, chosen] = True
        return keep
