"""Kept visual tokens drawn over the input images, like the paper's figures.

    model(**inputs)                                   # or model.generate(**inputs)
    pio_fvlm.viz.draw_selection(model, inputs, [image]).save("kept.png")

Every visual token is mapped to the image region it was computed from, per family:

- LLaVA-1.5: a square patch grid over the processor's view (shortest side resized, centre crop);
- LLaVA-NeXT: the base view (the whole image squashed to one tile, its own grid) and the
  high-resolution grid (tiles with the padding removed; the per-row newline tokens have no region);
- LLaVA-OneVision: as LLaVA-NeXT for a prompt with one image (the high-resolution grid shrunk
  when it exceeds 9 tiles' worth, as the model does), and the base view plus one newline for each
  image of a prompt with several;
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: 2 x 2 merged patches (28 or 32 px) of the dynamically resized image;
- InternVL: each tile's pixel-shuffled grid (2 x 2 patches per token) over its part of the image,
  then the thumbnail tile over the whole image. The tile layout is the one with the image's tile
  count whose aspect ratio is closest to the image's (the processor's rule).

Video tokens (pass the frames as ``videos=``) map to their frame's grid: Qwen2-VL / Qwen2.5-VL /
Qwen3-VL merged patches, one picture per temporal patch (its first frame; a temporal patch spans
``temporal_patch_size`` frames); LLaVA-OneVision's pooled grid (half the tower's side), one picture
per frame, and the newline after the video has no region.

Dropped regions are darkened, kept ones keep their colours and get an outline. One picture per
image and view (and per video frame), side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .compat import anyres_helpers


@dataclass(frozen=True)
class TokenView:
    """The visual tokens of one image in one view, in sequence order.

    ``boxes``: (n, 4) float (x0, y0, x1, y1) in the original image's pixels; NaN rows for tokens
    without a region (LLaVA-NeXT newlines, a CLS token). ``frame``: None for an image; for a
    video, the frame (of video ``image_index``) that the boxes are drawn on."""

    image_index: int
    name: str
    boxes: np.ndarray
    frame: int | None = None


def _grid_boxes(rows: int, cols: int, x0: float, y0: float, width: float, height: float) -> np.ndarray:
    """(rows * cols, 4) boxes of a rows x cols grid over the rectangle, row-major."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    cw, ch = width / cols, height / rows
    return np.stack([x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw, y0 + (r + 1) * ch], -1).reshape(-1, 4)


def _no_region(n: int) -> np.ndarray:
    return np.full((n, 4), np.nan)


def _llava_views(config: Any, sizes: list[tuple[int, int]]) -> list[TokenView]:
    side = config.vision_config.image_size // config.vision_config.patch_size
    views = []
    for i, (width, height) in enumerate(sizes):
        short = min(width, height)  # resize shortest side, centre crop: the crop in original pixels
        boxes = _grid_boxes(side, side, (width - short) / 2, (height - short) / 2, short, short)
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            boxes = np.concatenate([_no_region(1), boxes])
        views.append(TokenView(i, "", boxes))
    return views


def _llava_next_views(config: Any, sizes: list[tuple[int, int]]) -> list[TokenView]:
    side = config.vision_config.image_size // config.vision_config.patch_size
    views = []
    for i, (width, height) in enumerate(sizes):
        views.append(TokenView(i, "base", _grid_boxes(side, side, 0, 0, width, height)))
        rows, cols = _high_res_grid(config, width, height)
        views.append(TokenView(i, "high-res", _with_newlines(rows, cols, width, height)))
    return views


def _high_res_grid(config: Any, width: int, height: int, max_tiles: int | None = None) -> tuple[int, int]:
    """Rows and columns of LLaVA-NeXT / OneVision's unpadded high-resolution grid of one image; with
    ``max_tiles`` (OneVision's ``anyres_max_N``), shrunk as the model shrinks it."""
    get_anyres_image_grid_shape, unpad_image = anyres_helpers()

    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    tiles_h, tiles_w = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, tile)
    rows, cols = unpad_image(torch.empty(1, tiles_h * side, tiles_w * side), (height, width)).shape[1:]
    if max_tiles is not None:
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return int(rows), int(cols)


def _with_newlines(rows: int, cols: int, width: int, height: int) -> np.ndarray:
    """A rows x cols grid over the image with one region-less newline token after each row."""
    grid = _grid_boxes(rows, cols, 0, 0, width, height).reshape(rows, cols, 4)
    return np.concatenate([grid, _no_region(rows).reshape(rows, 1, 4)], axis=1).reshape(-1, 4)


def _onevision_views(config: Any, sizes: list[tuple[int, int]]) -> list[TokenView]:
    side = config.vision_config.image_size // config.vision_config.patch_size
    max_tiles = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).rsplit("_", 1)[-1])
    views = []
    for i, (width, height) in enumerate(sizes):
        base = _grid_boxes(side, side, 0, 0, width, height)
        if len(sizes) > 1:  # several images in one prompt: base view and a newline each, no anyres
            views.append(TokenView(i, "", np.concatenate([base, _no_region(1)])))
            continue
        views.append(TokenView(i, "base", base))
        rows, cols = _high_res_grid(config, width, height, max_tiles)
        views.append(TokenView(i, "high-res", _with_newlines(rows, cols, width, height)))
    return views


def tile_layout(tiles: int, width: int, height: int) -> tuple[int, int]:
    """(rows, columns) of ``tiles`` tiles whose aspect ratio is closest to the image's."""
    pairs = [(r, tiles // r) for r in range(1, tiles + 1) if tiles % r == 0]
    return min(pairs, key=lambda rc: abs(math.log((rc[1] / rc[0]) / (width / height))))


def _internvl_views(config: Any, sizes: list[tuple[int, int]], tiles: list[int]) -> list[TokenView]:
    vc = config.vision_config
    side = int(vc.image_size[0] // vc.patch_size[0] * config.downsample_ratio)
    views = []
    for i, ((width, height), n) in enumerate(zip(sizes, tiles)):
        whole = _grid_boxes(side, side, 0, 0, width, height)
        if n == 1:
            views.append(TokenView(i, "", whole))
            continue
        rows, cols = tile_layout(n - 1, width, height)
        tw, th = width / cols, height / rows
        parts = [_grid_boxes(side, side, c * tw, r * th, tw, th) for r in range(rows) for c in range(cols)]
        views.append(TokenView(i, f"{rows} x {cols} tiles", np.concatenate(parts)))
        views.append(TokenView(i, "thumbnail", whole))
    return views


def _runs(flags: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor, in order."""
    padded = torch.cat([flags.new_zeros(1), flags, flags.new_zeros(1)]).int()
    edges = padded.diff().nonzero().flatten().tolist()
    return [end - start for start, end in zip(edges[::2], edges[1::2])]


def _qwen_views(config: Any, sizes: list[tuple[int, int]], grids: torch.Tensor) -> list[TokenView]:
    merge = config.vision_config.spatial_merge_size
    views = []
    for i, ((width, height), (t, h, w)) in enumerate(zip(sizes, grids.tolist())):
        boxes = _grid_boxes(h // merge, w // merge, 0, 0, width, height)
        views.append(TokenView(i, "" if t == 1 else f"{t} frames", np.tile(boxes, (t, 1))))
    return views


def _sizes(images: list[Any]) -> list[tuple[int, int]]:
    return [(im.width, im.height) if hasattr(im, "width") else (im.shape[1], im.shape[0]) for im in images]


def _items_before(input_ids: torch.Tensor, sample: int, token_id: int, per_item: list[int]) -> int:
    """How many images (or videos) of the batch belong to samples before ``sample``, from their
    token counts ``per_item`` (in batch order) and the ``token_id`` tokens of the earlier rows."""
    before, seen = int((input_ids[:sample] == token_id).sum()), 0
    for n_items, n in enumerate([*per_item, 0]):  # the last slot: every item is before `sample`
        if seen == before:
            return n_items
        seen += n
    raise ValueError("the grids in inputs do not match the visual tokens in input_ids")


# Each family's layout: (config, inputs, images, sample) -> views (LAYOUTS maps model types to them).
def llava_views(config: Any, inputs: dict[str, Any], images: list[Any], sample: int) -> list[TokenView]:
    return _llava_views(config, _sizes(images))


def llava_next_views(config: Any, inputs: dict[str, Any], images: list[Any], sample: int) -> list[TokenView]:
    return _llava_next_views(config, _sizes(images))


def onevision_views(config: Any, inputs: dict[str, Any], images: list[Any], sample: int) -> list[TokenView]:
    return _onevision_views(config, _sizes(images))


def internvl_views(config: Any, inputs: dict[str, Any], images: list[Any], sample: int) -> list[TokenView]:
    per_tile = int(config.image_seq_length)
    runs = _runs(inputs["input_ids"][sample] == config.image_token_id)
    if len(runs) != len(images) or any(n % per_tile for n in runs):
        raise ValueError(f"sample {sample} has {len(runs)} image(s) of {runs} tokens (tiles of {per_tile}) but "
                         f"{len(images)} image(s) were passed to account for them: pass exactly that sample's "
                         f"images, in order")
    return _internvl_views(config, _sizes(images), [n // per_tile for n in runs])


def qwen_views(config: Any, inputs: dict[str, Any], images: list[Any], sample: int) -> list[TokenView]:
    if not images:  # e.g. a video-only sample; the processor leaves image_grid_thw out when no row has images
        return []
    grids = inputs["image_grid_thw"]
    merge = config.vision_config.spatial_merge_size
    per_image = [int(g.prod()) // merge**2 for g in grids]
    first = _items_before(inputs["input_ids"], sample, config.image_token_id, per_image)
    return _qwen_views(config, _sizes(images), grids[first:first + len(images)])


def qwen_video_views(config: Any, inputs: dict[str, Any], videos: list[Any], sample: int) -> list[TokenView]:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: per temporal patch, the merged grid over its first frame."""
    grids = inputs["video_grid_thw"]
    merge = config.vision_config.spatial_merge_size
    step = int(config.vision_config.temporal_patch_size)
    per_video = [int(g.prod()) // merge**2 for g in grids]
    first = _items_before(inputs["input_ids"], sample, config.video_token_id, per_video)
    chosen = grids[first:first + len(videos)].tolist()
    if len(chosen) != len(videos):
        raise ValueError(f"sample {sample} has {len(chosen)} video(s) but {len(videos)} were passed: pass exactly "
                         f"that sample's videos, in order")
    views = []
    for v, (video, (t, h, w)) in enumerate(zip(videos, chosen)):
        if math.ceil(len(video) / step) != t:  # the processor pads the last temporal patch with copies
            raise ValueError(f"video {v} of sample {sample} has {t} temporal patches of {step} frames but "
                             f"{len(video)} frames were passed: pass the frames the processor was given")
        (width, height), = _sizes([video[0]])
        boxes = _grid_boxes(h // merge, w // merge, 0, 0, width, height)
        views += [TokenView(v, f"frame {k * step}", boxes, frame=k * step) for k in range(t)]
    return views


def onevision_video_views(config: Any, inputs: dict[str, Any], videos: list[Any], sample: int
                          ) -> list[TokenView]:
    """LLaVA-OneVision: per frame, the tower's grid pooled to half its side; one newline per video."""
    pooled = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
    views = []
    for v, video in enumerate(videos):
        (width, height), = _sizes([video[0]])
        boxes = _grid_boxes(pooled, pooled, 0, 0, width, height)
        for f in range(len(video)):
            last = f == len(video) - 1  # the newline closes the video
            views.append(TokenView(v, f"frame {f}", np.concatenate([boxes, _no_region(1)]) if last else boxes,
                                   frame=f))
    return views


ViewsOf = Callable[[Any, dict[str, Any], list[Any], int], list[TokenView]]


@dataclass(frozen=True)
class Layout:
    """Where a family's visual tokens come from: ``images`` maps (config, inputs, images, sample)
    to the views of that sample's images; ``videos`` the same for videos (None: the family takes none)."""

    images: ViewsOf
    videos: ViewsOf | None = None


_QWEN = Layout(qwen_views, qwen_video_views)
LAYOUTS: dict[str, Layout] = {
    "llava": Layout(llava_views),
    "llava_next": Layout(llava_next_views),
    "llava_onevision": Layout(onevision_views, onevision_video_views),
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "qwen3_vl_moe": _QWEN,
    "internvl": Layout(internvl_views),
}


def _check_counts(inputs: dict[str, Any], sample: int, token_id: int, views: list[TokenView], n_items: int,
                  kind: str) -> None:
    n_tokens = int((inputs["input_ids"][sample] == token_id).sum())
    n_mapped = sum(len(v.boxes) for v in views)
    if n_tokens != n_mapped:
        raise ValueError(f"sample {sample} has {n_tokens} {kind} tokens but its {n_items} {kind}(s) "
                         f"account for {n_mapped}: pass exactly that sample's {kind}s, in order")


def token_views(model: Any, inputs: dict[str, Any], images: list[Any], sample: int = 0,
                videos: list[Any] | None = None) -> list[TokenView]:
    """Where each visual token of ``sample`` comes from (its images, then its videos, each in
    order), by its family's layout in :data:`LAYOUTS`.

    Args:
        images: the sample's images (PIL or (H, W, 3) arrays).
        videos: the sample's videos, each a sequence of frames (PIL or (H, W, 3) arrays), or None
            to leave video tokens undrawn.
    """
    from .models import adapter_for

    adapter = adapter_for(model)  # a clear error for a model that is not supported at all
    layout = LAYOUTS.get(model.config.model_type)
    if layout is None:
        raise ValueError(f"pio_fvlm.viz has no token layout for {adapter.name}")
    config = model.config
    views = layout.images(config, inputs, images, sample)
    _check_counts(inputs, sample, config.image_token_id, views, len(images), "image")
    if videos:
        if layout.videos is None:
            raise ValueError(f"pio_fvlm.viz has no video token layout for {adapter.name}")
        video_views = layout.videos(config, inputs, list(videos), sample)
        _check_counts(inputs, sample, config.video_token_id, video_views, len(videos), "video")
        views += video_views
    return views


def kept_grids(kept: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
               tokens_per_image: int = 576) -> list[np.ndarray]:
    """Per image of one sample, a (side, side) bool grid of the kept patches (LLaVA-1.5 grids).

    Args:
        kept: 1-D positions in ``input_ids`` of the kept visual tokens (``last_selection`` row).
        input_ids: (L,) the sample's ids, as passed to the model.
        image_token_id: the placeholder id of visual tokens.
        tokens_per_image: tokens of one image (a square number; 576 for LLaVA-1.5).
    """
    side = math.isqrt(tokens_per_image)
    if side * side != tokens_per_image:
        raise ValueError(f"tokens_per_image must be a square number (a patch grid); got {tokens_per_image}")
    flat = kept_flags(kept, input_ids, image_token_id, strict=True)
    if len(flat) % tokens_per_image:
        raise ValueError(
            f"the sample has {len(flat)} visual tokens, not a multiple of {tokens_per_image}: "
            f"pass the tokens_per_image of this model"
        )
    return [g.reshape(side, side) for g in np.split(flat, len(flat) // tokens_per_image)]


def kept_flags(kept: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, strict: bool = False) -> np.ndarray:
    """(n_image_tokens,) bool: which image tokens of the sample (in order) are at a kept position.
    ``strict``: every kept position must be an image token (else kept video tokens are skipped)."""
    positions = (input_ids == image_token_id).nonzero().flatten().tolist()
    index = {p: i for i, p in enumerate(positions)}
    flat = np.zeros(len(positions), dtype=bool)
    for p in kept.tolist():
        if p in index:
            flat[index[p]] = True
        elif strict or not 0 <= p < len(input_ids):
            raise ValueError(f"position {p} is not an image token of this sample")
    return flat


def draw_boxes(image: Any, boxes: np.ndarray, kept: np.ndarray, dim: float = 0.25) -> Any:
    """``image`` with every region darkened except the kept boxes, which get an outline.

    Args:
        image: PIL image or (H, W, 3) uint8 array.
        boxes: (n, 4) regions in the image's pixels (NaN rows are skipped).
        kept: (n,) bool.
    """
    from PIL import Image, ImageDraw

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    view = np.asarray(img.convert("RGB")).astype(np.float32)
    lit = np.zeros(view.shape[:2], dtype=bool)
    drawable = ~np.isnan(boxes).any(1)
    for x0, y0, x1, y1 in boxes[drawable & kept]:
        lit[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))] = True
    view[~lit] *= dim
    out = Image.fromarray(view.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in boxes[drawable & kept]:
        draw.rectangle([round(x0), round(y0), max(round(x0), round(x1) - 1), max(round(y0), round(y1) - 1)],
                       outline=(255, 255, 0))
    return out


def draw_kept(image: Any, grid: np.ndarray, size: int = 336, dim: float = 0.25) -> Any:
    """The square view (``size`` px, as LLaVA-1.5's processor sees it) with a (side, side) grid
    of kept patches drawn."""
    view = square_view(image, size)
    side = grid.shape[0]
    return draw_boxes(view, _grid_boxes(side, side, 0, 0, size, size), grid.reshape(-1), dim)


def draw_selection(model: Any, inputs: dict[str, Any], images: list[Any], sample: int = 0,
                   stage: int = -1, videos: list[Any] | None = None) -> Any:
    """The last call's kept tokens of ``sample`` over its ``images`` (one picture per image and
    view, side by side) and, given ``videos`` (each a sequence of frames), over their frames.
    ``inputs`` are the processor outputs that were passed to the model."""
    from .api import last_selection

    selection = last_selection(model, stage=stage)
    if selection is None:
        raise ValueError("no selection recorded: wrap the model and run it on `inputs` first")
    views = token_views(model, inputs, images, sample, videos)
    kept, ids = selection[sample].cpu(), inputs["input_ids"][sample].cpu()
    frames = list(videos or [])
    flags = {"image": kept_flags(kept, ids, model.config.image_token_id)}
    if frames:
        flags["video"] = kept_flags(kept, ids, model.config.video_token_id)
    pictures, start = [], {"image": 0, "video": 0}
    for view in views:
        kind = "image" if view.frame is None else "video"
        n = len(view.boxes)
        picture = images[view.image_index] if view.frame is None else frames[view.image_index][view.frame]
        pictures.append(draw_boxes(picture, view.boxes, flags[kind][start[kind]:start[kind] + n]))
        start[kind] += n
    return side_by_side(pictures)


def square_view(image: Any, size: int = 336) -> Any:
    """The processor's view: shortest side resized to ``size``, then a centre crop."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    scale = size / min(img.size)
    new_size = (max(size, round(img.width * scale)), max(size, round(img.height * scale)))
    img = img.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def with_caption(picture: Any, lines: list[str], line_height: int = 16, margin: int = 8) -> Any:
    """``picture`` with text ``lines`` written on a white band below it (PIL's default font)."""
    from PIL import Image, ImageDraw

    band = margin * 2 + line_height * len(lines)
    canvas = Image.new("RGB", (picture.width, picture.height + band), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((margin, picture.height + margin + i * line_height), line, fill=(20, 20, 20))
    return canvas


def side_by_side(pictures: list[Any], gap: int = 8) -> Any:
    """Pictures in one row (e.g. the original and kept tokens at several budgets)."""
    from PIL import Image

    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    height = max(p.height for p in pictures)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for p in pictures:
        canvas.paste(p, (x, 0))
        x += p.width + gap
    return canvas
