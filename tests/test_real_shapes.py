"""Real checkpoints' configurations, with random weights (no download).

LLaVA-1.5-7B runs for real at full width (4096 hidden, 32 heads, 32k vocabulary, CLIP-L/336)
with only 2 of its 32 decoder layers and 1 of 24 vision layers, to fit this machine's time;
LLaVA-OneVision-7B and InternVL3-8B likewise at their full widths (3584 hidden, 28 heads, 4 KV
heads, their towers and token counts) with 2 decoder layers, 1 vision layer and the vocabulary
cut to 32k (their 152k-row embeddings alone take longer to initialise than the test may).
All are also built on the meta device and checked for structure (the adapter finds every part,
the fast probe applies, the visual ids are right).
"""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import pio_fvlm
from pio_fvlm.checkpoint_configs import (
    CLIP_L_336,
    VICUNA_7B,
    internvl3_8b_config,
    llava15_7b_config,
    llava_onevision_7b_config,
    qwen2_5_vl_7b_config,
    qwen3_vl_8b_config,
    qwen3_vl_30b_a3b_config,
)
from pio_fvlm.models import adapter_for
from pio_fvlm.select.closed_form import supports_closed_form
from pio_fvlm.select.saliency import supports_fast_probe


@pytest.mark.slow
def test_llava15_7b_widths_run():
    torch.manual_seed(0)
    config = llava15_7b_config(text_layers=2, vision_layers=1)
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).eval()
    text = torch.randint(100, 30000, (1, 30))
    ids = torch.cat([text[:, :5], torch.full((1, 576), 32000), text[:, 5:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 336, 336)}
    pio_fvlm.wrap(model, budget=64)
    assert pio_fvlm.get_config(model).layer == 1
    with torch.inference_mode():
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    (kept,) = pio_fvlm.last_selection(model)
    assert len(kept) == 64 and bool((ids[0, kept] == 32000).all())
    assert out.logits.shape == (1, ids.shape[1], 32064)
    assert gen.shape[1] == ids.shape[1] + 2


@pytest.mark.parametrize(
    "name, build, visual_ids",
    [
        ("llava-hf/llava-1.5-7b-hf", lambda: LlavaForConditionalGeneration(llava15_7b_config()), (32000,)),
        (
            "llava-hf/llava-v1.6-vicuna-7b-hf",
            lambda: LlavaNextForConditionalGeneration(
                LlavaNextConfig(
                    vision_config=CLIPVisionConfig(**CLIP_L_336),
                    text_config=LlamaConfig(**VICUNA_7B),
                    image_token_id=32000,
                    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                    vision_feature_layer=-2,
                )
            ),
            (32000,),
        ),
        (
            "Qwen/Qwen2-VL-7B-Instruct",
            lambda: Qwen2VLForConditionalGeneration(
                Qwen2VLConfig(
                    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                      "rope_theta": 1000000.0}),
                    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16),
                    image_token_id=151655,
                    video_token_id=151656,
                )
            ),
            (151655, 151656),
        ),
        (
            "Qwen/Qwen2.5-VL-7B-Instruct",
            lambda: Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_7b_config()),
            (151655, 151656),
        ),
        (
            "llava-hf/llava-onevision-qwen2-7b-ov-hf",
            lambda: LlavaOnevisionForConditionalGeneration(llava_onevision_7b_config()),
            (151646, 151647),
        ),
        ("OpenGVLab/InternVL3-8B-hf", lambda: InternVLForConditionalGeneration(internvl3_8b_config()), (151667,)),
        ("Qwen/Qwen3-VL-8B-Instruct", lambda: _qwen3_vl(qwen3_vl_8b_config()), (151655, 151656)),
        ("Qwen/Qwen3-VL-30B-A3B-Instruct", lambda: _qwen3_vl(qwen3_vl_30b_a3b_config()), (151655, 151656)),
    ],
)
def test_real_configs_structure(name, build, visual_ids):
    with torch.device("meta"):
        model = build()
    parts = adapter_for(model).find_parts(model)
    assert parts.visual_token_ids == visual_ids
    assert len(parts.layers) == model.config.text_config.num_hidden_layers
    closed = supports_closed_form(parts.layers[1], parts.norm, parts.head)
    assert supports_fast_probe(parts.layers[1]), f"{name}: the exact fast probe should apply"
    assert closed == ("A3B" not in name), f"{name}: the closed form applies to all but routed experts"
    pio_fvlm.wrap(model, budget=64, layer=2)
    assert pio_fvlm.is_wrapped(model)
    pio_fvlm.unwrap(model)


def _qwen3_vl(config):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_config(config)


def _real_width_run(model, inputs, image_id: int, n_visual: int, budget: int = 64) -> None:
    pio_fvlm.wrap(model, budget=budget)
    with torch.inference_mode():
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    (kept,) = pio_fvlm.last_selection(model)
    ids = inputs["input_ids"]
    assert int((ids == image_id).sum()) == n_visual
    assert len(kept) == budget and bool((ids[0, kept] == image_id).all())
    assert out.logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert gen.shape[1] == ids.shape[1] + 2


@pytest.mark.slow
def test_llava_onevision_7b_widths_run():
    torch.manual_seed(0)
    config = llava_onevision_7b_config(text_layers=2, vision_layers=1)
    config.text_config.vocab_size = 32000
    config.image_token_id, config.video_token_id = 31998, 31999
    config._attn_implementation = "sdpa"
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # one 384 x 768 image: base view (729) + a 1 x 2 crop grid of 27 x 54 with a newline per row (27 x 55)
    sizes = torch.tensor([[384, 768]])
    pixels = torch.randn(1, 3, 3, 384, 384)
    with torch.no_grad():
        n_visual = int(model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output[0].shape[0])
    assert n_visual == 729 + 27 * 55
    text = torch.randint(100, 30000, (1, 25))
    ids = torch.cat([text[:, :5], torch.full((1, n_visual), 31998), text[:, 5:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_sizes": sizes}
    _real_width_run(model, inputs, 31998, n_visual)


@pytest.mark.slow
def test_internvl3_8b_widths_run():
    torch.manual_seed(0)
    config = internvl3_8b_config(text_layers=2, vision_layers=1)
    config.text_config.vocab_size = 32000
    config.image_token_id = 31999
    config._attn_implementation = "sdpa"
    model = InternVLForConditionalGeneration(config).eval()
    # one image as 2 tiles + the thumbnail: 3 x 256 tokens between <img> and </img>
    text = torch.randint(100, 30000, (1, 25))
    ids = torch.cat([text[:, :5], torch.tensor([[31997]]), torch.full((1, 768), 31999), torch.tensor([[31998]]),
                     text[:, 5:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(3, 3, 448, 448)}
    _real_width_run(model, inputs, 31999, 768)


@pytest.mark.slow
def test_qwen3_vl_8b_widths_run_with_deepstack_after_the_prune_layer():
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = qwen3_vl_8b_config(text_layers=3, vision_layers=3)
    config.vision_config.deepstack_visual_indexes = [0, 1, 2]  # injections after LM layers 0, 1, 2
    config.text_config.vocab_size = 32000
    config.image_token_id, config.vision_start_token_id, config.vision_end_token_id = 31999, 31997, 31998
    config._attn_implementation = "sdpa"
    model = Qwen3VLForConditionalGeneration(config).eval()
    # a 512 x 512 image: 32 x 32 patches of 16 px, merged 2 x 2 into 256 tokens
    text = torch.randint(100, 30000, (1, 25))
    ids = torch.cat([text[:, :5], torch.tensor([[31997]]), torch.full((1, 256), 31999), torch.tensor([[31998]]),
                     text[:, 5:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(32 * 32, 3 * 2 * 16 * 16), "image_grid_thw": torch.tensor([[1, 32, 32]]),
              "mm_token_type_ids": (ids == 31999).long()}
    _real_width_run(model, inputs, 31999, 256)
