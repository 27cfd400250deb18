"""Encoder-involved mode on Qwen2-VL / Qwen2.5-VL: window-local + global selection on the vision
tower's attention, merging of the rest, then gradient saliency in the LM."""

import pytest
import torch

import pio_fvlm
from helpers import (
    assert_cached_equals_uncached_and_batch_equals_alone,
    assert_encoder_then_pio_stages,
    layer_lengths,
    n_visual,
)
from pio_fvlm.encoder.qwen_windows import merged_window_layout, window_first
from pio_fvlm.encoder.visionzip import share_budget, split_dominant
from tiny_models import Prompt, make_batch, tiny_vlm

# grids (1,6,6) -> 9 tokens in 2 x 2-token windows (4 windows), (1,4,6) -> 6, two images -> 6 + 6
PROMPTS = [Prompt(before=[5, 6], after=[9, 10, 11, 12], size=2), Prompt(before=[5], after=[9, 10], images=2, size=1)]


@pytest.fixture(params=["qwen2_5_vl", "qwen2_vl"])
def model(request):
    return tiny_vlm(request.param, num_layers=4, seed=61)


def test_window_layout_matches_the_tower():
    from transformers.vision_utils import get_vision_window_index

    grids = torch.tensor([[1, 6, 6], [1, 4, 6], [1, 10, 8]])
    window_index, _ = get_vision_window_index(grids, spatial_merge_size=2, window_size=56, patch_size=14)
    offset, ours = 0, []
    for t, h, w in grids.tolist():
        order, _ = merged_window_layout(t, h, w, 2, 2)
        ours.append(order + offset)
        offset += t * h * w // 4
    assert torch.equal(torch.cat(ours), window_index)


def test_budget_shares_and_window_first():
    assert share_budget(5, [9, 6]) == [3, 2] and sum(share_budget(7, [4, 6, 9])) == 7
    assert share_budget(30, [4, 6]) == [4, 6]
    score = torch.tensor([0.9, 0.8, 0.1, 0.05, 0.7, 0.2])
    window = torch.tensor([0, 0, 1, 1, 0, 2])
    assert window_first(score, window, 3).tolist() == [0, 5, 2]  # best of windows 0, 2, 1
    assert window_first(score, window, 5).tolist() == [0, 5, 2, 1, 4]


def test_layer_lengths_and_kept_sets(model):
    inputs = make_batch(model, PROMPTS)
    pio_fvlm.wrap(model, budget=3, layer=2, encoder="visionzip", encoder_budget=5)
    with torch.no_grad(), layer_lengths(model) as seen:
        model(**inputs)
    length = inputs["input_ids"].shape[1]
    counts = n_visual(inputs)  # 9 and 12
    assert seen[0] == seen[1] == max(length - n + 5 for n in counts)  # text + encoder_budget (per sample)
    assert seen[2] == seen[3] == max(length - n + 3 for n in counts)
    assert_encoder_then_pio_stages(model, [5, 5], [3, 3])


def _reference_scores(model, inputs):
    """Attention received per merged token, from an independent full computation on the
    inputs of the tower's last full-attention block (HF's rotary and window order)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    tower, vc = model.model.visual, model.config.vision_config
    full = list(getattr(vc, "fullatt_block_indexes", None) or [])
    block = tower.blocks[max(full) if full else -1]
    seen = {}
    handle = block.attn.register_forward_pre_hook(lambda m, a, kw: seen.update(h=a[0], kw=kw), with_kwargs=True)
    with torch.no_grad():
        tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    handle.remove()
    attn, h = block.attn, seen["h"]
    q, k, _ = attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["kw"]["position_embeddings"])
    grids = inputs["image_grid_thw"]
    if full:
        window_index, _ = get_vision_window_index(grids, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    else:
        window_index = torch.arange(int(grids.prod(-1).sum()) // 4)
    scores, start = [], 0
    for _t, gh, gw in grids.tolist():
        n = gh * gw
        qi, ki = q[start:start + n].transpose(0, 1), k[start:start + n].transpose(0, 1)
        probs = (qi @ ki.transpose(1, 2) * attn.scaling).softmax(-1)  # (H, n, n)
        scores.append(probs.mean((0, 1)).view(-1, 4).sum(1))
        start += n
    window_order = torch.cat(scores)
    natural = torch.empty_like(window_order)
    natural[window_index] = window_order
    return natural


def test_dominant_tokens_follow_the_towers_attention(model):
    inputs = make_batch(model, PROMPTS[:1])
    pio_fvlm.wrap(model, budget=9, encoder="visionzip", encoder_budget=5)
    with torch.no_grad():
        model(**inputs)
    (image,) = pio_fvlm.describe(model).selectors[0].capture.take()
    reference = _reference_scores(model, inputs)
    torch.testing.assert_close(image.score, reference, rtol=1e-4, atol=1e-6)
    n_dom, _ = split_dominant(5, 9)
    dominant = window_first(reference, image.window, n_dom)
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    kept = set(pio_fvlm.last_selection(model, 0)[0].tolist())
    assert {int(positions[i]) for i in dominant} <= kept and len(kept) == 5


def test_cached_equals_uncached_and_batch_equals_alone(model):
    assert_cached_equals_uncached_and_batch_equals_alone(model, PROMPTS, budget=3, layer=2,
                                                         encoder="visionzip", encoder_budget=5)


def test_videos_are_refused(model):
    batch = make_batch(model, [Prompt(before=[5], after=[9, 10], videos=1)])
    pio_fvlm.wrap(model, budget=3, encoder="visionzip", encoder_budget=5)
    with pytest.raises(ValueError, match="images only"), torch.no_grad():
        model(**batch)


def test_deepcopy_of_a_wrapped_model_keeps_encoder_mode(model):
    import copy

    inputs = make_batch(model, PROMPTS)
    pio_fvlm.wrap(model, budget=3, layer=2, encoder="visionzip", encoder_budget=5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        a, b = model(**inputs).logits, twin(**inputs).logits
    torch.testing.assert_close(a, b)
    assert [len(s) for s in pio_fvlm.last_selection(twin, 0)] == [5, 5]
