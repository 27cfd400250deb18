"""Encoder-involved mode for Qwen2.5-VL: window-local + global selection on the vision tower's
attention, then merging, before the language model.

Qwen2.5-VL has no [CLS] token, and its tower attends inside windows except in a few
full-attention blocks. Importance of a patch = the attention it receives, averaged over every
query of its image and every head, in the *last full-attention block* (computed from that
block's own projections and rotary embeddings, in query chunks: no attention map is kept and
the tower's backend is untouched). A language-model token is a 2 x 2 merge of patches: it
scores the sum of its patches.

Per sample, ``encoder_budget`` tokens survive (images share it in proportion to their token
counts; Qwen's dynamic resolution gives images different counts, so the budget is per sample,
like ``budget``). Per image, dominant tokens are chosen *window-local first* (the best token of
each attention window, best windows first), then globally by score; the rest are merged into
contextual tokens by key similarity (VisionZip's 54:10 split), as for LLaVA-1.5. Images only:
a video in the batch is refused with an error.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import torch

from ..select.selector import SelectionRequest
from ..tensor_ops import attention_probs
from .visionzip import dominant_and_contextual, images_of_sample, share_budget, split_dominant

QUERY_CHUNK = 1024  # queries per softmax chunk: bounds memory at (heads, chunk, patches)


@dataclass
class ImageScores:
    """One image, in the LM's token order (row-major merged grid): ``score`` (n,),
    ``key`` (n, head_dim) mean key over heads and merged patches, ``window`` (n,) window id."""

    score: torch.Tensor
    key: torch.Tensor
    window: torch.Tensor


def merged_window_layout(t: int, h: int, w: int, merge: int,
                         window_merged: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For one image/video of (t, h, w) patches: the tower's window order of its merged tokens
    (``order[j]`` = natural index of the j-th token in window order) and each token's window id
    (natural order). Windows are ``window_merged`` x ``window_merged`` merged tokens, row-major,
    tokens row-major inside a window (as Qwen2.5-VL's tower lays them out); ``None``: no
    windows (Qwen2-VL), natural order."""
    gh, gw = h // merge, w // merge
    window_merged = window_merged or max(gh, gw)
    r = torch.arange(gh).view(gh, 1).expand(gh, gw)
    c = torch.arange(gw).view(1, gw).expand(gh, gw)
    windows_w = -(-gw // window_merged)
    window = ((r // window_merged) * windows_w + (c // window_merged)).reshape(-1)
    inner = ((r % window_merged) * window_merged + (c % window_merged)).reshape(-1)
    frame = torch.arange(t).repeat_interleave(gh * gw)
    window_t = window.repeat(t) + frame * int(window.max() + 1)
    key = window_t * window_merged**2 + inner.repeat(t)  # windows in order, row-major inside
    order = torch.sort(key, stable=True).indices
    return order, window_t


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The vision tower's rotary embedding: x (s, H, hd), cos / sin (s, hd); fp32 out."""
    x, cos, sin = x.float(), cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class RefuseVideos:
    """Pre-hook on the base model: encoder mode reduces images only (video tokens in a prefill's
    ``input_ids`` are refused; generate passes precomputed features, so pixels cannot tell)."""

    def __init__(self, video_token_id: int) -> None:
        self.video_token_id = video_token_id

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1 and bool((ids == self.video_token_id).any()):
            raise ValueError("pio_fvlm: encoder mode on Qwen2-VL / Qwen2.5-VL reduces images only; this call has "
                             "videos. Wrap without encoder= for video inputs.")


class QwenAttentionCapture:
    """Records per vision-tower call the grids (tower pre-hook) and, in the last full-attention
    block, each merged token's received attention and key (attention pre-hook)."""

    def __init__(self, merge: int, window_merged: int | None) -> None:
        self.merge, self.window_merged = merge, window_merged
        self._fresh()

    def _fresh(self) -> None:
        self._grids: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
            f"pio_fvlm_qwen_grid_{id(self)}", default=None)
        # the latest tower call's images (each call replaces it; see ClsAttentionCapture.hook)
        self._captured: contextvars.ContextVar[list[ImageScores] | None] = contextvars.ContextVar(
            f"pio_fvlm_qwen_scores_{id(self)}", default=None)

    def __getstate__(self) -> dict[str, Any]:
        return {"merge": self.merge, "window_merged": self.window_merged}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh()

    def tower_hook(self, tower: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._grids.set(grid)

    def attention_hook(self, attn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        grids = self._grids.get()
        if grids is None:
            raise RuntimeError("pio_fvlm encoder mode: the vision block ran outside the vision tower's forward")
        h = args[0] if args else kwargs["hidden_states"]  # (patches of all images, width), window order
        cos, sin = kwargs["position_embeddings"]
        s = h.shape[0]
        q, k, _ = attn.qkv(h).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (s, H, hd)
        q_rot, k_rot = rotary(q, cos, sin), rotary(k, cos, sin)
        unit = self.merge**2
        out: list[ImageScores] = []
        start = 0
        for t, gh, gw in grids.tolist():
            n_patches = t * gh * gw
            received = torch.zeros(n_patches, dtype=torch.float32, device=h.device)
            per_frame = gh * gw
            for f in range(t):  # full attention spans one frame (cu_seqlens per frame)
                a = start + f * per_frame
                keys = k_rot[a : a + per_frame].transpose(0, 1).float()  # (H, n, hd)
                for c in range(0, per_frame, QUERY_CHUNK):
                    queries = q_rot[a + c : a + min(per_frame, c + QUERY_CHUNK)].transpose(0, 1).float()
                    probs = attention_probs(queries, keys, attn.scaling)  # (H, chunk, n)
                    received[f * per_frame : (f + 1) * per_frame] += probs.sum((0, 1))
                received[f * per_frame : (f + 1) * per_frame] /= attn.num_heads * per_frame
            score_w = received.view(-1, unit).sum(1)  # merged tokens, window order
            key_w = k[start : start + n_patches].float().mean(1).view(-1, unit, k.shape[-1]).mean(1)
            order, window = merged_window_layout(t, gh, gw, self.merge, self.window_merged)
            order = order.to(h.device)
            score = torch.empty_like(score_w).index_copy_(0, order, score_w)
            key = torch.empty_like(key_w).index_copy_(0, order, key_w)
            out.append(ImageScores(score, key, window.to(h.device)))
            start += n_patches
        self._captured.set(out)

    def take(self) -> list[ImageScores]:
        captured = self._captured.get()
        if not captured:
            raise RuntimeError(
                "pio_fvlm encoder mode: no vision-tower attention was captured for this call; pass "
                "pixel_values with the images (precomputed image features cannot be reduced)"
            )
        return captured


def window_first(score: torch.Tensor, window: torch.Tensor, n_dom: int) -> torch.Tensor:
    """``n_dom`` indices: the best token of each window (best windows first), then the best of
    the rest globally."""
    order = score.argsort(descending=True, stable=True)
    first_of_window = torch.zeros_like(order, dtype=torch.bool)
    seen: set[int] = set()
    for rank, idx in enumerate(order.tolist()):
        w = int(window[idx])
        if w not in seen:
            seen.add(w)
            first_of_window[rank] = True
    ranked = torch.cat([order[first_of_window], order[~first_of_window]])
    return ranked[:n_dom]


class QwenWindowSelector:
    """The layer-0 stage of Qwen2.5-VL's encoder mode (see the module docstring)."""

    def __init__(self, capture: QwenAttentionCapture) -> None:
        self.capture = capture

    def __call__(self, request: SelectionRequest) -> tuple[torch.Tensor, torch.Tensor]:
        images = iter(self.capture.take())
        cand, hidden = request.candidates, request.probe_inputs.hidden
        keep = torch.zeros_like(cand)
        merged = hidden.clone()
        for b in range(cand.shape[0]):
            positions = cand[b].nonzero().flatten()
            mine = images_of_sample(images, positions.numel(), lambda x: len(x.score))
            shares = share_budget(int(request.budgets[b]), [len(x.score) for x in mine])
            start = 0
            for image, share in zip(mine, shares):
                n = len(image.score)
                pos = positions[start : start + n]
                start += n
                n_dom, n_ctx = split_dominant(share, n)
                dev = hidden.device
                score, key, window = image.score.to(dev), image.key.to(dev), image.window.to(dev)
                dominant = window_first(score, window, n_dom)
                local_keep, rows = dominant_and_contextual(key, hidden[b, pos], dominant, n_ctx)
                keep[b, pos] = local_keep
                merged[b, pos] = rows
        return keep, merged
