"""Encoder-involved mode on LLaVA-NeXT: per-tile [CLS] attention over the anyres layout."""

import pytest
import torch

import pio_fvlm
from helpers import (
    assert_cached_equals_uncached_and_batch_equals_alone,
    assert_encoder_then_pio_stages,
    layer_lengths,
    n_visual,
)
from pio_fvlm.encoder.next_tiles import tile_patch_map
from pio_fvlm.encoder.visionzip import split_dominant
from tiny_models import NEXT_IMAGE_SIZES, Prompt, make_batch, tiny_vlm

GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[0, 1, 2, 3, 4])
# sizes (30, 60) -> base + 2 tiles, (60, 60) -> base + 4 tiles; 2 x 2 patches per tile
PROMPTS = [Prompt(before=[5, 6], after=[9, 10, 11, 12], size=1), Prompt(before=[5], after=[9, 10], images=2, size=2)]


@pytest.fixture
def model():
    return tiny_vlm("llava_next", num_layers=4, seed=71)


@pytest.mark.parametrize("size", [(28, 28), (30, 60), (60, 30), (60, 60), (50, 60)])
def test_token_layout_matches_hf_packing(model, size):
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    tile_of, patch_of = tile_patch_map(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size, side)
    n_tiles = int(tile_of.max()) + 1
    # features that say where they come from: (tile, patch), packed by HF itself
    feats = torch.stack(torch.meshgrid(torch.arange(n_tiles), torch.arange(side * side), indexing="ij"), -1).float()
    (packed, *_), _ = model.model.pack_image_features([feats], torch.tensor([size]), "default",
                                                image_newline=torch.tensor([-1.0, -1.0]))
    assert torch.equal(packed[:, 0].long(), tile_of) and torch.equal(packed[:, 1].long(), patch_of)


def test_layer_lengths_and_kept_sets(model):
    inputs = make_batch(model, PROMPTS)
    pio_fvlm.wrap(model, budget=4, layer=2, encoder="visionzip", encoder_budget=9)
    with torch.no_grad(), layer_lengths(model) as seen:
        model(**inputs)
    length = inputs["input_ids"].shape[1]
    counts = n_visual(inputs)
    assert seen[0] == seen[1] == max(length - n + min(9, n) for n in counts)
    assert seen[2] == seen[3] == max(length - n + 4 for n in counts)
    assert_encoder_then_pio_stages(model, [9, 9], [4, 4])


def test_dominant_tokens_follow_each_tiles_cls_attention(model):
    inputs = make_batch(model, PROMPTS[:1])
    pio_fvlm.wrap(model, budget=9, encoder="visionzip", encoder_budget=7)
    with torch.no_grad():
        model(**inputs)
    kept = set(pio_fvlm.last_selection(model, 0)[0].tolist())
    # reference: an eager run of the tower on the image's tiles, [CLS] row of the feature layer
    cfg = model.config
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    size = NEXT_IMAGE_SIZES[1]
    tile_of, patch_of = tile_patch_map(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size, side)
    tiles = inputs["pixel_values"][0, : int(tile_of.max()) + 1]
    with torch.no_grad():
        attentions = tower(tiles, output_attentions=True).attentions
    cls_rows = attentions[-1][:, :, 0, 1:].mean(1)  # (tiles, patches)
    score = torch.where(tile_of >= 0, cls_rows[tile_of.clamp(min=0), patch_of.clamp(min=0)], float("-inf"))
    n_dom, _ = split_dominant(7, int((tile_of >= 0).sum()))
    positions = (inputs["input_ids"][0] == cfg.image_token_id).nonzero().flatten()
    dominant = {int(positions[i]) for i in score.topk(n_dom).indices}
    assert dominant <= kept and len(kept) == 7
    newlines = {int(positions[i]) for i in (tile_of < 0).nonzero().flatten()}
    assert not newlines & kept  # newline tokens are dropped (never merged into contextual ones)


def test_cached_equals_uncached_and_batch_equals_alone(model):
    assert_cached_equals_uncached_and_batch_equals_alone(model, PROMPTS, budget=4, layer=2,
                                                         encoder="visionzip", encoder_budget=9)


def test_generate_deepcopy_and_unwrap(model):
    import copy

    batch = make_batch(model, PROMPTS)
    pio_fvlm.wrap(model, budget=4, layer=2, encoder="visionzip", encoder_budget=9)
    twin = copy.deepcopy(model)
    assert twin.model.__dict__["get_image_features"].module is twin.model  # the stand-in follows the copy
    out = model.generate(**batch, **GEN)
    assert torch.equal(out, twin.generate(**batch, **GEN))
    assert [len(s) for s in pio_fvlm.last_selection(twin, 0)] == [9, 9]
    pio_fvlm.unwrap(model)
    assert "get_image_features" not in model.model.__dict__
    plain = tiny_vlm("llava_next", num_layers=4, seed=71)
    assert torch.equal(model.generate(**batch, **GEN), plain.generate(**batch, **GEN))
