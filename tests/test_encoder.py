"""Encoder-involved mode (VisionZip-style reduction before the LM, then gradient saliency)."""

import pytest
import torch

import pio_fvlm
from helpers import (
    assert_cached_equals_uncached_and_batch_equals_alone,
    assert_encoder_then_pio_stages,
    layer_lengths,
    n_visual,
)
from pio_fvlm.encoder.visionzip import DOMINANT_SHARE
from tiny_models import Prompt, make_batch, tiny_vlm

PROMPTS = [Prompt(before=[5, 6], after=[9, 10, 11, 12]), Prompt(before=[5], after=[9, 10], images=2)]


@pytest.fixture
def model():
    return tiny_vlm("llava", num_layers=4, seed=51)  # 16 visual tokens per image


def test_layer_lengths_and_kept_sets(model):
    inputs = make_batch(model, PROMPTS)
    pio_fvlm.wrap(model, budget=4, layer=2, encoder="visionzip", encoder_budget=8)
    with torch.no_grad(), layer_lengths(model) as seen:
        model(**inputs)
    length = inputs["input_ids"].shape[1]
    counts = n_visual(inputs)  # 16 and 32
    enc = [n // 16 * 8 for n in counts]
    assert seen[0] == seen[1] == max(length - n + e for n, e in zip(counts, enc))  # text + encoder_budget
    assert seen[2] == seen[3] == max(length - n + 4 for n in counts)  # text + budget
    assert_encoder_then_pio_stages(model, enc, [4, 4])


def test_dominant_tokens_follow_cls_attention(model):
    inputs = make_batch(model, PROMPTS[:1])
    pio_fvlm.wrap(model, budget=8, encoder="visionzip", encoder_budget=8)
    with torch.no_grad():
        model(**inputs)
    kept = set(pio_fvlm.last_selection(model, 0)[0].tolist())
    # reference: the attention map of an eager run of the vision tower
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = tower(inputs["pixel_values"], output_attentions=True).attentions
    cls_row = attentions[-1][0, :, 0, 1:].mean(0)  # feature layer -1, [CLS] query, patches
    n_dom = round(8 * DOMINANT_SHARE)
    first = int((inputs["input_ids"][0] == 3).nonzero()[0])
    dominant = {first + int(i) for i in cls_row.topk(n_dom).indices}
    assert dominant <= kept and len(kept) == 8


def test_cached_equals_uncached_and_batch_equals_alone(model):
    assert_cached_equals_uncached_and_batch_equals_alone(model, PROMPTS, budget=4, layer=2,
                                                         encoder="visionzip", encoder_budget=8)


def test_encoder_mode_errors(model):
    with pytest.raises(ValueError, match="needs encoder_budget"):
        pio_fvlm.wrap(model, budget=4, encoder="visionzip")
    with pytest.raises(ValueError, match="encoder must be one of"):
        pio_fvlm.wrap(model, budget=4, encoder="zip", encoder_budget=8)
    with pytest.raises(ValueError, match="encoder_budget=8 needs an encoder mode: pass encoder='visionzip'"):
        pio_fvlm.wrap(model, budget=4, encoder_budget=8)


@pytest.mark.parametrize("family, why", [("llava_onevision", "SigLIP tower has no \\[CLS\\]"),
                                         ("internvl", "pixel shuffle"), ("qwen3_vl", "DeepStack")])
def test_encoder_mode_is_refused_with_the_reason_where_no_score_exists(family, why):
    from tiny_models import tiny_vlm

    model = tiny_vlm(family)
    with pytest.raises(ValueError, match=why) as refused:
        pio_fvlm.wrap(model, budget=4, encoder="visionzip", encoder_budget=8)
    assert "Use encoder=None" in str(refused.value)
    assert not pio_fvlm.is_wrapped(model)
