"""Kept-token pictures for every family: each image token maps to its region, counts match the
model's own token layout, kept regions are lit and dropped ones dark."""

import numpy as np
import pytest
import torch
from PIL import Image

import pio_fvlm
from pio_fvlm.viz import draw_boxes, draw_selection, kept_flags, token_views
from tiny_models import (
    FAMILIES,
    NEXT_IMAGE_SIZES,
    ONEVISION_VIDEO_FRAMES,
    QWEN_IMAGE_GRIDS,
    QWEN_VIDEO_GRID,
    VIDEO_FAMILIES,
    Prompt,
    make_batch,
    tiny_vlm,
)


def _images_for(model, prompt: Prompt) -> list[Image.Image]:
    """Grey images of the sizes make_batch assumed for this prompt."""
    kind = model.config.model_type
    if kind == "llava":
        side = model.config.vision_config.image_size
        size = (side + 10, side)  # not square: the centre crop is what gets drawn
    elif kind in ("llava_next", "llava_onevision"):
        h, w = NEXT_IMAGE_SIZES[prompt.size]
        size = (w, h)
    elif kind == "internvl":
        size = (90, 40)  # wide: two tiles side by side
    else:
        _, h, w = QWEN_IMAGE_GRIDS[prompt.size]
        patch = model.config.vision_config.patch_size
        size = (w * patch, h * patch)
    return [Image.new("RGB", size, (200, 200, 200)) for _ in range(prompt.images)]


def _frames_for(model) -> list[Image.Image]:
    """The frames of one video as make_batch laid it out, one colour per frame: OneVision's 4
    frames (any size), Qwen's temporal patches x frames per patch at the grid's size."""
    if model.config.model_type == "llava_onevision":
        size, n_frames = (40, 30), ONEVISION_VIDEO_FRAMES
    else:
        t, h, w = QWEN_VIDEO_GRID
        patch = model.config.vision_config.patch_size
        size, n_frames = (w * patch, h * patch), t * model.config.vision_config.temporal_patch_size
    return [Image.new("RGB", size, (60 + 40 * f, 200, 200)) for f in range(n_frames)]


@pytest.mark.parametrize("family", FAMILIES)
def test_selection_picture_for_every_family(family):
    model = tiny_vlm(family)
    prompts = [Prompt([11, 12], [13, 14, 15, 16, 17]), Prompt([11], [13, 14, 15, 16, 17, 18], images=2, size=1)]
    batch = make_batch(model, prompts)
    pio_fvlm.wrap(model, budget=3)
    with torch.no_grad():
        model(**batch)
    images = _images_for(model, prompts[1])
    views = token_views(model, batch, images, sample=1)
    n_image_tokens = int((batch["input_ids"][1] == model.config.image_token_id).sum())
    assert sum(len(v.boxes) for v in views) == n_image_tokens
    boxes = np.concatenate([v.boxes for v in views])
    drawable = boxes[~np.isnan(boxes).any(1)]
    for view in views:  # every region lies inside its image
        image = images[view.image_index]
        ok = view.boxes[~np.isnan(view.boxes).any(1)]
        assert (ok[:, :2] >= -1e-6).all() and (ok[:, 2] <= image.width + 1e-6).all()
        assert (ok[:, 3] <= image.height + 1e-6).all()
    assert len(drawable) > 0
    kept = pio_fvlm.last_selection(model)[1]
    flags = kept_flags(kept, batch["input_ids"][1], model.config.image_token_id)
    assert flags.sum() == 3
    picture = draw_selection(model, batch, images, sample=1)
    assert picture.height == max(im.height for im in images)
    with pytest.raises(ValueError, match="account for"):
        token_views(model, batch, images[:1], sample=1)


def test_llava_next_views_have_newlines_where_the_model_puts_them():
    model = tiny_vlm("llava_next")
    prompts = [Prompt([11], [13, 14], size=1)]  # 30 x 60: base + a wide high-res grid
    batch = make_batch(model, prompts)
    views = token_views(model, batch, _images_for(model, prompts[0]))
    base, high = views
    assert base.name == "base" and len(base.boxes) == 4 and not np.isnan(base.boxes).any()
    no_region = np.isnan(high.boxes).any(1)
    rows = int(no_region.sum())  # one newline per row of the unpadded grid
    cols = len(high.boxes) // rows - 1
    assert no_region.tolist() == ([False] * cols + [True]) * rows
    # the unpadded grid keeps the image's aspect ratio (30 x 60 -> twice as wide as high)
    assert cols == 2 * rows


def test_a_kept_box_is_lit_and_the_rest_dark():
    image = np.full((20, 30, 3), 200, dtype=np.uint8)
    boxes = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [np.nan] * 4])
    out = np.asarray(draw_boxes(image, boxes, np.array([False, True, True])))
    assert out[5, 15].mean() > 150 and out[5, 5].mean() < 80 and out[15, 25].mean() < 80


def test_qwen_tokens_follow_the_merged_grid_row_major():
    model = tiny_vlm("qwen2_vl")
    prompts = [Prompt([11], [13, 14], size=1)]  # grid (1, 4, 6) -> 2 x 3 merged tokens
    batch = make_batch(model, prompts)
    (view,) = token_views(model, batch, _images_for(model, prompts[0]))
    assert view.boxes.tolist() == [[0, 0, 28, 28], [28, 0, 56, 28], [56, 0, 84, 28],
                                   [0, 28, 28, 56], [28, 28, 56, 56], [56, 28, 84, 56]]


def test_internvl_tiles_cover_the_image_in_the_processors_layout():
    from pio_fvlm.viz import tile_layout

    assert tile_layout(2, 90, 40) == (1, 2) and tile_layout(2, 40, 90) == (2, 1)
    assert tile_layout(6, 1200, 400) == (1, 6) and tile_layout(6, 600, 400) == (2, 3)
    model = tiny_vlm("internvl")
    batch = make_batch(model, [Prompt([11], [13, 14], size=2)])  # 3 tiles: 2 + the thumbnail
    views = token_views(model, batch, [Image.new("RGB", (90, 40))])
    assert [v.name for v in views] == ["1 x 2 tiles", "thumbnail"]
    tiles = views[0].boxes.reshape(2, 4, 4)  # per tile its 2 x 2 tokens
    assert np.allclose(tiles[0, :, 0].min(), 0) and np.allclose(tiles[0, :, 2].max(), 45)
    assert np.allclose(tiles[1, :, 0].min(), 45) and np.allclose(tiles[1, :, 2].max(), 90)
    assert np.allclose(views[1].boxes[-1], [45, 20, 90, 40])  # the thumbnail's last token: bottom right


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_tokens_map_to_their_frames(family):
    model = tiny_vlm(family)
    prompts = [Prompt([11], [13, 14, 15, 16, 17], videos=1), Prompt([11, 12], [13, 14, 15, 16, 17, 18])]
    batch = make_batch(model, prompts)
    pio_fvlm.wrap(model, budget=3)
    with torch.no_grad():
        model(**batch)
    frames = _frames_for(model)
    step = 1 if family == "llava_onevision" else model.config.vision_config.temporal_patch_size
    expected_frames = list(range(0, len(frames), step))
    images = _images_for(model, prompts[0])
    views = token_views(model, batch, images, sample=0, videos=[frames])
    video_views = [v for v in views if v.frame is not None]
    assert [v.frame for v in video_views] == expected_frames
    n_video_tokens = int((batch["input_ids"][0] == model.config.video_token_id).sum())
    assert sum(len(v.boxes) for v in video_views) == n_video_tokens
    for view in video_views:  # every region lies inside its frame
        ok = view.boxes[~np.isnan(view.boxes).any(1)]
        frame = frames[view.frame]
        assert len(ok) and (ok >= -1e-6).all()
        assert (ok[:, 2] <= frame.width + 1e-6).all() and (ok[:, 3] <= frame.height + 1e-6).all()
    if family == "llava_onevision":  # the newline after the video has no region
        assert np.isnan(video_views[-1].boxes[-1]).all() and not np.isnan(video_views[0].boxes).any()
    else:  # merged 2 x 2 patches, row-major, the same grid on every temporal patch
        p = model.config.vision_config.patch_size
        assert video_views[0].boxes.tolist() == video_views[1].boxes.tolist()
        assert video_views[0].boxes[1].tolist() == [2 * p, 0, 4 * p, 2 * p]
    kept = pio_fvlm.last_selection(model)[0]
    ids = batch["input_ids"][0]
    flags = [kept_flags(kept, ids, model.config.image_token_id), kept_flags(kept, ids, model.config.video_token_id)]
    assert sum(int(f.sum()) for f in flags) == 3  # the budget, images and video together
    picture = np.asarray(draw_selection(model, batch, images, sample=0, videos=[frames]))
    widths = [(images[v.image_index] if v.frame is None else frames[v.frame]).width for v in views]
    assert picture.shape[1] == sum(widths) + 8 * (len(views) - 1)
    # each video view is its own frame with the kept video tokens lit
    x, start = 0, 0
    for view, width in zip(views, widths):
        if view.frame is not None:
            n = len(view.boxes)
            want = np.asarray(draw_boxes(frames[view.frame], view.boxes, flags[1][start:start + n]))
            assert np.array_equal(picture[:want.shape[0], x:x + width], want), view.name
            start += n
        x += width + 8
    with pytest.raises(ValueError, match="pass exactly that sample's videos"):
        token_views(model, batch, images, sample=0, videos=[frames, frames])
    if family != "llava_onevision":
        with pytest.raises(ValueError, match="pass the frames the processor was given"):
            token_views(model, batch, images, sample=0, videos=[frames + frames])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_a_video_only_sample_after_other_samples(family):
    model = tiny_vlm(family)
    prompts = [Prompt([11], [13, 14, 15]), Prompt([11], [13, 14, 15], images=0, videos=1),
               Prompt([11, 12], [13, 14], images=0, videos=1), Prompt([11], [13, 14, 15, 16])]
    batch = make_batch(model, prompts)
    pio_fvlm.wrap(model, budget=3)
    with torch.no_grad():
        model(**batch)
    frames = _frames_for(model)
    for sample in (1, 2):
        views = token_views(model, batch, [], sample=sample, videos=[frames])
        assert views and all(v.frame is not None for v in views)
        assert draw_selection(model, batch, [], sample=sample, videos=[frames]).height == frames[0].height
    for sample in (0, 3):  # samples without a video, before and after the videos of the batch
        with pytest.raises(ValueError, match="pass exactly that sample's videos"):
            token_views(model, batch, _images_for(model, prompts[sample]), sample=sample, videos=[frames])
    # a batch without any image (the processor then gives no image grids)
    videos_only = make_batch(model, prompts[1:3])
    with torch.no_grad():
        model(**videos_only)
    assert token_views(model, videos_only, [], sample=1, videos=[frames])


def test_a_family_without_videos_says_so():
    model = tiny_vlm("llava")
    batch = make_batch(model, [Prompt([11], [13, 14])])
    images = _images_for(model, Prompt([11], [13, 14]))
    with pytest.raises(ValueError, match="no video token layout for LLaVA"):
        token_views(model, batch, images, videos=[[images[0]]])
