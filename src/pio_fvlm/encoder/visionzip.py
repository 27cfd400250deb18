"""Encoder-involved mode for LLaVA-1.5: a VisionZip-style reduction before the language model.

Per image, ``encoder_budget`` tokens survive into the language model: the *dominant* patches
(the most attention from the [CLS] query in the vision layer whose output feeds the projector)
and a few *contextual* tokens, each the mean of a group of the remaining patches (groups form
around evenly spaced targets by key similarity). VisionZip's split of 54 dominant + 10
contextual per 64 is kept for every budget.

How it is done here (own implementation, differs from VisionZip on purpose):
* the [CLS] attention row is computed from that vision layer's own projections for the one
  [CLS] query (no switch of the whole tower to eager attention, no attention map);
* the reduction acts at the language model's input, as a prune stage at layer 0: kept tokens
  are gathered and each contextual token carries the mean of its group's *projected* features
  (VisionZip merges before the projector). ``input_ids`` and HF's own image-feature merging stay
  untouched, so ``generate``, caching and batching work as in every other mode; the
  gradient-saliency stage later in the LM treats merged tokens like any other visual token.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from ..select.selector import SelectionRequest
from ..tensor_ops import attention_probs

DOMINANT_SHARE = 54 / 64  # VisionZip's dominant / total split


class ClsAttentionCapture:
    """Records, per vision-tower call, the [CLS] query's attention over the patches and the
    patches' keys, in the vision layer that feeds the projector.

    ``drop_cls``: whether the model's features drop [CLS] (``vision_feature_select_strategy``
    "default"), so that scores line up with the visual tokens in ``input_ids``.
    """

    def __init__(self, drop_cls: bool) -> None:
        self.drop_cls = drop_cls
        self._fresh()

    def _fresh(self) -> None:
        # the latest vision-tower call's capture, per thread / context
        self._captured: contextvars.ContextVar[tuple[torch.Tensor, torch.Tensor] | None] = contextvars.ContextVar(
            f"pio_fvlm_cls_{id(self)}", default=None
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"drop_cls": self.drop_cls}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.drop_cls = state["drop_cls"]
        self._fresh()

    def hook(self, attn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on the vision layer's self-attention (input: normalised states).

        Each tower call replaces the previous capture: the tower sees all images of a call at
        once, and generate computes image features in a call of their own before the prefill
        (a stray tower run, e.g. to count tokens, must not leak into the next prefill)."""
        h = args[0] if args else kwargs["hidden_states"]  # (images, 1 + patches, width)
        n, s, _ = h.shape
        q = attn.q_proj(h[:, :1]).view(n, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)  # (n, H, s, hd)
        cls_attention = attention_probs(q, k, attn.scale).mean(1).squeeze(1)  # (n, s)
        keys = k.mean(1).float()  # (n, s, hd)
        if self.drop_cls:
            cls_attention, keys = cls_attention[:, 1:], keys[:, 1:]
        self._captured.set((cls_attention, keys))

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The latest tower call's images, in order: scores (n, P), keys (n, P, hd). It stays
        readable after the call: generate without a cache re-runs the language model on the same
        image features without re-running the vision tower."""
        captured = self._captured.get()
        if captured is None:
            raise RuntimeError(
                "pio_fvlm encoder mode: no vision-tower attention was captured for this call; pass "
                "pixel_values with the images (precomputed image features cannot be reduced)"
            )
        return captured


def kept_per_image(encoder_budget: int, tokens_per_image: int) -> int:
    return min(encoder_budget, tokens_per_image)


def dominant_and_contextual(
    key: torch.Tensor, rows: torch.Tensor, dominant: torch.Tensor, n_ctx: int, mergeable: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: keep the ``dominant`` tokens, merge the rest into ``n_ctx`` contextual tokens.

    The rest are grouped around ``n_ctx`` evenly spaced targets (in image order) by key cosine
    similarity; each target's row becomes the mean of its group.

    Args:
        key: (P, d) keys for similarity;
        rows: (P, D) the image's token rows (hidden states at the LM input);
        dominant: (n_dom,) indices into the P tokens.
        mergeable: (P,) bool, tokens that may join contextual groups (default: all); the others
            are dropped unless dominant (LLaVA-NeXT's row-end newline tokens).
    Returns:
        keep: (P,) bool, ``n_dom + n_ctx`` True; rows: (P, D) with targets replaced by means.
    """
    device, n = rows.device, rows.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    keep[dominant] = True
    rows = rows.clone()
    if n_ctx == 0:
        return keep, rows
    rest = ~keep if mergeable is None else ~keep & mergeable
    rest_idx = rest.nonzero().flatten()  # in image (= sequence) order
    targets = rest_idx[(torch.arange(n_ctx, device=device) * rest_idx.numel()) // n_ctx]
    unit = F.normalize(key.float(), dim=-1)
    group = (unit[rest_idx] @ unit[targets].T).argmax(-1)  # each rest token -> a target
    group[torch.searchsorted(rest_idx, targets)] = torch.arange(n_ctx, device=device)
    sums = torch.zeros(n_ctx, rows.shape[-1], dtype=torch.float32, device=device)
    sums.index_add_(0, group, rows[rest_idx].float())
    counts = torch.bincount(group, minlength=n_ctx).clamp(min=1).unsqueeze(1)
    rows[targets] = (sums / counts).to(rows.dtype)
    keep[targets] = True
    return keep, rows


def split_dominant(total: int, available: int) -> tuple[int, int]:
    """(dominant, contextual) counts for ``total`` kept of ``available`` tokens (VisionZip's 54:10)."""
    if total >= available:
        return available, 0
    n_dom = max(1, min(total, round(total * DOMINANT_SHARE)))
    return n_dom, total - n_dom


T = TypeVar("T")


def images_of_sample(images: Iterator[T], n_tokens: int, length: Callable[[T], int]) -> list[T]:
    """The next images of a batch (in order) whose tokens make up one sample's ``n_tokens``."""
    mine: list[T] = []
    while sum(length(x) for x in mine) < n_tokens:
        nxt = next(images, None)
        if nxt is None:
            raise RuntimeError("encoder mode: more visual tokens in input_ids than the vision tower saw "
                               "(videos are not supported in encoder mode)")
        mine.append(nxt)
    if sum(length(x) for x in mine) != n_tokens:
        raise RuntimeError("encoder mode: the image tokens in input_ids do not line up with the images")
    return mine


def share_budget(total: int, counts: list[int]) -> list[int]:
    """Split ``total`` kept tokens over images of ``counts`` tokens, proportionally (largest
    remainder), never more than an image has."""
    n = sum(counts)
    if total >= n:
        return list(counts)
    exact = [total * c / n for c in counts]
    shares = [int(e) for e in exact]
    for i in sorted(range(len(counts)), key=lambda i: exact[i] - shares[i], reverse=True)[: total - sum(shares)]:
        shares[i] += 1
    return shares


class PerSampleBudget:
    """Visual tokens a sample keeps from layer 0 on: ``kept`` at most."""

    def __init__(self, kept: int) -> None:
        self.kept = kept

    def __call__(self, n_visual: int) -> int:
        return min(self.kept, n_visual)


class VisionZipSelector:
    """The layer-0 stage of encoder mode: dominant + contextual tokens per image."""

    def __init__(self, capture: ClsAttentionCapture, encoder_budget: int, tokens_per_image: int) -> None:
        self.capture = capture
        self.encoder_budget = encoder_budget
        self.tokens_per_image = tokens_per_image

    def __call__(self, request: SelectionRequest) -> tuple[torch.Tensor, torch.Tensor]:
        scores, keys = self.capture.take()
        cand, hidden = request.candidates, request.probe_inputs.hidden
        keep = torch.zeros_like(cand)
        merged = hidden.clone()
        per = self.tokens_per_image
        n_dom, n_ctx = split_dominant(kept_per_image(self.encoder_budget, per), per)
        image = 0
        for b in range(cand.shape[0]):
            positions = cand[b].nonzero().flatten()
            for j in range(positions.numel() // per):
                pos = positions[j * per : (j + 1) * per]
                if image >= scores.shape[0]:
                    raise RuntimeError("encoder mode: more images in input_ids than the vision tower saw")
                score, key = scores[image].to(hidden.device), keys[image].to(hidden.device)
                image += 1
                local_keep, rows = dominant_and_contextual(key, hidden[b, pos], score.topk(n_dom).indices, n_ctx)
                keep[b, pos] = local_keep
                merged[b, pos] = rows
        return keep, merged
