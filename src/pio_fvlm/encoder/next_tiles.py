"""Encoder-involved mode for LLaVA-NeXT: VisionZip-style reduction over its anyres tiles.

A LLaVA-NeXT image becomes a base tile (the whole image resized) and a grid of high-resolution
tiles, each through the CLIP tower with its own [CLS]; HF then removes the padding of the tile
grid and appends a learned newline token after every row. Every visual token except the
newlines is one patch of one tile, so it scores the attention its tile's [CLS] query pays to it
(captured in the feature layer as for LLaVA-1.5). Per image: dominant tokens by that score,
the rest (newlines excluded) merged into contextual tokens by key similarity; newlines are
dropped unless an image keeps nearly everything. ``encoder_budget`` is per sample (images of
different sizes have different token counts and share it in proportion), like on Qwen.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any

import torch

from ..compat import anyres_helpers
from ..select.selector import SelectionRequest
from .visionzip import ClsAttentionCapture, dominant_and_contextual, images_of_sample, share_budget, split_dominant


def tile_patch_map(image_size: tuple[int, int], pinpoints: list[list[int]], tile: int,
                   side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each visual token of one image comes from, in HF's token order.

    Returns:
        tile_of: (n,) long, the tile (0 = base, then the grid row-major), -1 for newlines;
        patch_of: (n,) long, the patch within its tile (row-major), -1 for newlines.
    """
    get_anyres_image_grid_shape, unpad_image = anyres_helpers()

    tiles_h, tiles_w = get_anyres_image_grid_shape(image_size, pinpoints, tile)
    full_h, full_w = tiles_h * side, tiles_w * side
    where = torch.arange(full_h * full_w).view(1, full_h, full_w)  # global index of each feature cell
    kept = unpad_image(where, image_size)[0]  # (rows, cols): HF's own unpadding
    gr, gc = kept // full_w, kept % full_w
    tile_hr = 1 + (gr // side) * tiles_w + gc // side
    patch_hr = (gr % side) * side + gc % side
    rows = kept.shape[0]
    newline = torch.full((rows, 1), -1)
    tile_of = torch.cat([torch.zeros(side * side, dtype=torch.long),
                         torch.cat([tile_hr, newline], 1).reshape(-1)])
    patch_of = torch.cat([torch.arange(side * side), torch.cat([patch_hr, newline], 1).reshape(-1)])
    return tile_of, patch_of


class ImageSizesCapture:
    """The ``image_sizes`` of the current call (noted by :class:`RecordImageSizes`)."""

    def __init__(self) -> None:
        self._fresh()

    def _fresh(self) -> None:
        self._sizes: contextvars.ContextVar[Any] = contextvars.ContextVar(f"pio_fvlm_sizes_{id(self)}", default=None)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._fresh()

    def note(self, sizes: Any) -> None:
        self._sizes.set(sizes)

    def take(self) -> list[tuple[int, int]]:
        sizes = self._sizes.get()
        if sizes is None:
            raise RuntimeError("pio_fvlm encoder mode: LLaVA-NeXT needs image_sizes with pixel_values")
        rows = sizes.tolist() if hasattr(sizes, "tolist") else sizes
        return [(int(h), int(w)) for h, w in rows]


class RecordImageSizes:
    """Instance-level stand-in for ``LlavaNextModel.get_image_features`` that notes the
    ``image_sizes`` it is called with, then calls the class's method. Holds the module (so a
    deepcopy or pickle of the model maps it to the copy) and shows the method's signature
    (generate inspects it to pick its arguments)."""

    def __init__(self, module: Any, sizes: ImageSizesCapture) -> None:
        self.module, self.sizes = module, sizes

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.module).get_image_features.__get__(self.module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.sizes.note(kwargs.get("image_sizes", args[1] if len(args) > 1 else None))
        return type(self.module).get_image_features(self.module, *args, **kwargs)


class NextTilesSelector:
    """The layer-0 stage of LLaVA-NeXT's encoder mode (see the module docstring)."""

    def __init__(self, capture: ClsAttentionCapture, sizes: ImageSizesCapture, pinpoints: list[list[int]],
                 tile: int, side: int) -> None:
        self.capture, self.sizes = capture, sizes
        self.pinpoints, self.tile, self.side = pinpoints, tile, side

    def __call__(self, request: SelectionRequest) -> tuple[torch.Tensor, torch.Tensor]:
        cand, hidden = request.candidates, request.probe_inputs.hidden
        scores, keys = (t.to(hidden.device) for t in self.capture.take())  # (tiles, 576), (tiles, 576, hd)
        layouts = [tile_patch_map(s, self.pinpoints, self.tile, self.side) for s in self.sizes.take()]
        keep = torch.zeros_like(cand)
        merged = hidden.clone()
        images, first_tile = iter(layouts), 0
        for b in range(cand.shape[0]):
            positions = cand[b].nonzero().flatten()
            mine = images_of_sample(images, positions.numel(), lambda layout: len(layout[0]))
            shares = share_budget(int(request.budgets[b]), [len(t) for t, _ in mine])
            start = 0
            for (tile_of, patch_of), share in zip(mine, shares):
                n = len(tile_of)
                pos = positions[start : start + n]
                start += n
                dev = hidden.device
                tile_of, patch_of = tile_of.to(dev), patch_of.to(dev)
                patch = tile_of >= 0
                t_idx = (first_tile + tile_of).clamp(min=first_tile)
                p_idx = patch_of.clamp(min=0)
                score = scores[t_idx, p_idx].masked_fill(~patch, float("-inf"))
                key = keys[t_idx, p_idx]
                first_tile += int(tile_of.max()) + 1
                available = int(patch.sum())
                if share >= n:
                    keep[b, pos] = True
                    continue
                n_dom, n_ctx = split_dominant(min(share, available), available)
                dominant = score.topk(n_dom).indices
                if share > available:  # nearly everything: all patches, then newlines in order
                    extra = (~patch).nonzero().flatten()[: share - available]
                    dominant = torch.cat([dominant, extra])
                local_keep, rows = dominant_and_contextual(key, hidden[b, pos], dominant, n_ctx, patch)
                keep[b, pos] = local_keep
                merged[b, pos] = rows
        return keep, merged
