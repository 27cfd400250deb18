"""Kept visual tokens drawn over the input image (LLaVA-1.5-style square patch grids).

    kept = pio_fvlm.last_selection(model)[0]
    picture = pio_fvlm.viz.draw_kept(image, kept_grids(kept, inputs["input_ids"][0], 32000)[0])
    picture.save("kept.png")

Patches that were dropped are darkened; kept ones keep their colours and get an outline. The
picture shows the square view the vision tower sees (shortest side resized, centre crop), the
way CLIP processors prepare LLaVA-1.5 inputs. LLaVA-NeXT crops and Qwen's merged patches are
not drawn yet.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def kept_grids(kept: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
               tokens_per_image: int = 576) -> list[np.ndarray]:
    """Per image of one sample, a (side, side) bool grid of the kept patches.

    Args:
        kept: 1-D positions in ``input_ids`` of the kept visual tokens (``last_selection`` row).
        input_ids: (L,) the sample's ids, as passed to the model.
        image_token_id: the placeholder id of visual tokens.
        tokens_per_image: tokens of one image (a square number; 576 for LLaVA-1.5).
    """
    side = math.isqrt(tokens_per_image)
    if side * side != tokens_per_image:
        raise ValueError(f"tokens_per_image must be a square number (a patch grid); got {tokens_per_image}")
    positions = (input_ids == image_token_id).nonzero().flatten().tolist()
    if len(positions) % tokens_per_image:
        raise ValueError(
            f"the sample has {len(positions)} visual tokens, not a multiple of {tokens_per_image}: "
            f"pass the tokens_per_image of this model"
        )
    index = {p: i for i, p in enumerate(positions)}
    flat = np.zeros(len(positions), dtype=bool)
    for p in kept.tolist():
        if p not in index:
            raise ValueError(f"position {p} is not a visual token of this sample")
        flat[index[p]] = True
    return [g.reshape(side, side) for g in np.split(flat, len(positions) // tokens_per_image)]


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


def draw_kept(image: Any, grid: np.ndarray, size: int = 336, dim: float = 0.25) -> Any:
    """The image's square view with dropped patches darkened and kept ones outlined.

    Args:
        image: PIL image or (H, W, 3) uint8 array.
        grid: (side, side) bool, True where the patch's token was kept.
        dim: brightness left to dropped patches.
    Returns:
        A PIL image of ``size x size``.
    """
    from PIL import Image, ImageDraw

    view = np.asarray(square_view(image, size)).astype(np.float32)
    side = grid.shape[0]
    cell = size / side
    cells = (np.arange(size) // cell).astype(int).clip(max=side - 1)  # pixel -> patch row/column
    mask = grid[cells][:, cells]
    view[~mask] *= dim
    out = Image.fromarray(view.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for r, c in zip(*np.nonzero(grid)):
        x0, y0 = c * cell, r * cell
        draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(255, 255, 0))
    return out


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
