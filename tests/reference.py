"""A naive, step-by-step implementation of the method as the authors' released code computes it
(README, "How it works"), written for clarity, not speed.

Full-sequence probe layer, head over the whole sequence, shifted proxy positions, and a
Python NMS loop per sample. The library must agree with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_nms(saliency, features, candidates, budget, threshold):
    """One sample. saliency (N,), features (N, D), candidates (N,) bool -> sorted kept positions."""
    cand = [i for i in range(len(saliency)) if candidates[i]]
    order = sorted(cand, key=lambda i: (-float(saliency[i]), i))
    unit = F.normalize(features.double(), dim=-1)
    selected, suppressed = [], set()
    for i in order:
        if len(selected) == budget:
            break
        if i in suppressed:
            continue
        selected.append(i)
        if threshold is not None:
            for j in order:
                if float(unit[i] @ unit[j]) >= threshold:
                    suppressed.add(j)
    for i in order:  # fill by saliency when everything got suppressed
        if len(selected) == budget:
            break
        if i not in selected:
            selected.append(i)
    return sorted(selected)


def naive_saliency(model, inputs, layer_index, k=4, include_last=False):
    """Saliency (B, L) of every position for an *unwrapped* LLaVA, by the method's step 1 (proxy
    loss, input gradient norm)."""
    lm = model.model.language_model
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        captured["kwargs"] = {
            key: kwargs[key] for key in ("attention_mask", "position_ids", "position_embeddings") if key in kwargs
        }

    handle = lm.layers[layer_index].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    x = hidden.clone().requires_grad_(True)
    with torch.enable_grad():
        y = lm.layers[layer_index](x, **captured["kwargs"], use_cache=False)
        logits = model.lm_head(lm.norm(y)).float()  # the whole sequence, as the authors
        mask = inputs["attention_mask"].bool()
        total = 0.0
        for b in range(hidden.shape[0]):
            last = int(mask[b].nonzero().max())
            end = last if include_last else last - 1
            pos = list(range(end - k + 1, end + 1))
            row = logits[b, pos]
            total = total + F.cross_entropy(row, row.argmax(-1).detach())
        (grad,) = torch.autograd.grad(total, x)
    return grad.float().norm(dim=-1), hidden


def naive_selection(model, inputs, layer_index, budget, threshold=0.8, k=4, include_last=False, visual_ids=(3, 4)):
    """Per sample, the sorted kept visual positions by the method's steps 1-2 (saliency, then NMS to the budget)."""
    saliency, hidden = naive_saliency(model, inputs, layer_index, k, include_last)
    out = []
    for b in range(hidden.shape[0]):
        cand = torch.isin(inputs["input_ids"][b], torch.tensor(visual_ids))
        n = int(cand.sum())
        keep = budget if isinstance(budget, int) else max(1, int(budget * n + 0.5))
        out.append(naive_nms(saliency[b], hidden[b].float(), cand, min(keep, n), threshold))
    return out
