"""The models and inputs the speed benchmark runs (random weights, no downloads).

Each shape has the real visual-token count of a regime people prune:

=====================  ========  ==============================================================
shape                  visual    what it stands for
=====================  ========  ==============================================================
``miniature``          576       LLaVA-1.5 (CLIP 336 px / patch 14), one image
``llava-672``          2,304     a LLaVA-1.5-style tower at 672 px (high resolution)
``llava-next``         2,928     LLaVA-NeXT anyres, a 672 x 672 image (base view + 2 x 2 tiles,
                                 one newline per row)
``qwen2.5-vl-1344``    2,304     Qwen2.5-VL, a 1344 x 1344 image (patch 14, 2 x 2 merge)
``qwen2.5-vl-video``   4,096     Qwen2.5-VL, a 32-frame video at 448 x 448
``llava-onevision``    7,371     LLaVA-OneVision anyres, a 1152 x 1152 image (base view + 3 x 3
                                 crops of 729 tokens, one newline per row)
``internvl-7-tiles``   1,792     InternVL, an image as 6 tiles + the thumbnail (256 tokens each)
``qwen3-vl-1024``      1,024     Qwen3-VL, a 1024 x 1024 image (patch 16, 2 x 2 merge), DeepStack
=====================  ========  ==============================================================

On a CPU they are miniatures: the real token layout and depth with narrow layers (the
LLaVA-1.5 one keeps 7B's proportions shrunk 8x; the larger shapes are narrower still so that a
prefill of thousands of tokens takes seconds). ``llava-1.5-7b``, ``llava-next-7b`` and
``qwen2.5-vl-7b`` / ``qwen2.5-vl-7b-video``, ``llava-onevision-7b``, ``internvl3-8b`` and
``qwen3-vl-8b`` build the real 7B / 8B shapes, for a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import checkpoint_configs as real
from .compat import anyres_patch_count

# The special-token ids of the miniatures (random weights: any ids outside the text ids drawn work).
VISION_START_ID, VISION_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 1, 2, 3, 4
TEXT_BEFORE = 5  # text tokens before the visual ones; the rest of --text-tokens comes after


@dataclass(frozen=True)
class Shape:
    """A model to build and the visual input it takes."""

    build: Callable[[str, torch.dtype, str, int | None], nn.Module]
    visual: str  # "llava-image" | "next-image" | "onevision-image" | "internvl-image" | "qwen-image" | "qwen-video"
    image_px: int = 336
    frames: int = 0
    tiles: int = 0  # InternVL: tiles of the image, the thumbnail included
    cpu_miniature: bool = True


def _llama_text(hidden: int, mlp: int, heads: int, kv_heads: int, layers: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=4000, pad_token_id=0, max_position_embeddings=8192)


def _clip(image_px: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                            image_size=image_px, patch_size=14, projection_dim=128)


def _finish(model: nn.Module, dtype: torch.dtype, device: str) -> nn.Module:
    return model.eval().to(dtype=dtype, device=device)


def miniature_llava(attn: str = "sdpa", dtype: torch.dtype = torch.float32, num_layers: int = 32,
                    image_px: int = 336, hidden: int = 512) -> nn.Module:
    """LLaVA-1.5-7B's shape, shrunk 8x in width (hidden 512, MLP 1376, vocabulary 4000, so that
    the head's cost per layer matches 7B's), 32 layers; ``image_px=672`` gives 2,304 tokens."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(**_llama_text(hidden, hidden * 43 // 16, 8, 8, num_layers))
    config = LlavaConfig(vision_config=_clip(image_px), text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config).eval().to(dtype)


def miniature_llava_next(attn: str, dtype: torch.dtype, num_layers: int = 32, hidden: int = 256) -> nn.Module:
    """LLaVA-NeXT-7B's layout (CLIP 336 px tiles, anyres grid pinpoints, Vicuna-style LM), narrow."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaNextConfig(vision_config=_clip(336), text_config=LlamaConfig(**_llama_text(
        hidden, hidden * 43 // 16, 4, 4, num_layers)), image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    config._attn_implementation = attn
    return LlavaNextForConditionalGeneration(config).eval().to(dtype)


def miniature_qwen2_5_vl(attn: str, dtype: torch.dtype, num_layers: int = 28, hidden: int = 256) -> nn.Module:
    """Qwen2.5-VL-7B's layout (windowed vision tower with full-attention blocks, 2 x 2 merge,
    M-RoPE, grouped-query attention 4:1), narrow: head size 64, M-RoPE sections (8, 12, 12)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    heads = hidden // 64
    text = _llama_text(hidden, hidden * 37 // 7, heads, max(1, heads // 4), num_layers)
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0}
    vision = dict(depth=4, hidden_size=64, num_heads=2, in_chans=3, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, intermediate_size=128, out_hidden_size=hidden, window_size=112,
                  fullatt_block_indexes=[3])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                              video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                              vision_end_token_id=VISION_END_ID)
    config._attn_implementation = attn
    return Qwen2_5_VLForConditionalGeneration(config).eval().to(dtype)


def _qwen2_text(hidden: int, layers: int) -> dict[str, Any]:
    """A Qwen2-style LM config (q/k/v bias, GQA 7:1 as Qwen2-7B, head size 64), narrow."""
    heads = hidden // 64
    return dict(model_type="qwen2", **_llama_text(hidden, hidden * 37 // 7, heads, max(1, heads // 4), layers),
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def miniature_llava_onevision(attn: str, dtype: torch.dtype, num_layers: int = 28, hidden: int = 256) -> nn.Module:
    """LLaVA-OneVision-7B's layout (SigLIP at 384 px: 729 tokens per view, anyres up to 9 crops,
    Qwen2 LM), narrow."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, image_size=384, patch_size=14)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=_qwen2_text(hidden, num_layers),
                                  image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1)
    config._attn_implementation = attn
    return LlavaOnevisionForConditionalGeneration(config).eval().to(dtype)


def miniature_internvl(attn: str, dtype: torch.dtype, num_layers: int = 28, hidden: int = 256) -> nn.Module:
    """InternVL3-8B's layout (448 px tiles, pixel shuffle to 256 tokens per tile, Qwen2 LM), narrow."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=[448, 448], patch_size=[14, 14])
    config = InternVLConfig(vision_config=vision, text_config=_qwen2_text(hidden, num_layers),
                            image_token_id=IMAGE_TOKEN_ID, image_seq_length=256, downsample_ratio=0.5)
    config._attn_implementation = attn
    return InternVLForConditionalGeneration(config).eval().to(dtype)


def miniature_qwen3_vl(attn: str, dtype: torch.dtype, num_layers: int = 36, hidden: int = 256) -> nn.Module:
    """Qwen3-VL-8B's layout (patch 16 tower with DeepStack taps, interleaved M-RoPE, q/k norms,
    grouped-query attention 4:1), narrow: head size 64."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    heads = hidden // 64
    text = _llama_text(hidden, hidden * 3, heads, max(1, heads // 4), num_layers)
    text.update(head_dim=64, rope_parameters={"rope_type": "default", "mrope_section": [12, 10, 10],
                                               "mrope_interleaved": True, "rope_theta": 5000000.0})
    vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=2304,
                  deepstack_visual_indexes=[1, 2, 3])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                           video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                           vision_end_token_id=VISION_END_ID)
    config._attn_implementation = attn
    return Qwen3VLForConditionalGeneration(config).eval().to(dtype)


def random_qwen3_vl_8b(attn: str, dtype: torch.dtype, device: str, num_layers: int = 36) -> nn.Module:
    """Qwen3-VL-8B-Instruct's real shapes with random weights, built on ``device``."""
    from transformers import Qwen3VLForConditionalGeneration

    config = real.qwen3_vl_8b_config(text_layers=num_layers)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return real.build_on_device(Qwen3VLForConditionalGeneration, config, dtype, device)


def random_llava_onevision_7b(attn: str, dtype: torch.dtype, device: str, num_layers: int = 28) -> nn.Module:
    """llava-onevision-qwen2-7b-ov-hf's real shapes with random weights, built on ``device``."""
    from transformers import LlavaOnevisionForConditionalGeneration

    config = real.llava_onevision_7b_config(text_layers=num_layers)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return real.build_on_device(LlavaOnevisionForConditionalGeneration, config, dtype, device)


def random_internvl3_8b(attn: str, dtype: torch.dtype, device: str, num_layers: int = 28) -> nn.Module:
    """InternVL3-8B-hf's real shapes with random weights, built on ``device``."""
    from transformers import InternVLForConditionalGeneration

    config = real.internvl3_8b_config(text_layers=num_layers)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return real.build_on_device(InternVLForConditionalGeneration, config, dtype, device)


# llava-hf/llava-v1.6-vicuna-7b-hf's anyres resolutions
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def random_llava15_7b(attn: str, dtype: torch.dtype, device: str, num_layers: int = 32) -> nn.Module:
    """LLaVA-1.5-7B's real shapes (CLIP-L/336, 32 x 4096 Vicuna) with random weights, built
    directly on ``device`` in ``dtype`` (about 14 GB in bf16): the GPU check without a download."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = real.llava15_7b_config(text_layers=num_layers)
    config._attn_implementation = attn
    return real.build_on_device(LlavaForConditionalGeneration, config, dtype, device)


def random_llava_next_7b(attn: str, dtype: torch.dtype, device: str, num_layers: int = 32) -> nn.Module:
    """LLaVA-NeXT-7B's (llava-v1.6-vicuna-7b) real shapes with random weights, built on ``device``."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    base = real.llava15_7b_config(text_layers=num_layers)
    config = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                             image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return real.build_on_device(LlavaNextForConditionalGeneration, config, dtype, device)


def random_qwen2_5_vl_7b(attn: str, dtype: torch.dtype, device: str, num_layers: int | None = None) -> nn.Module:
    """Qwen2.5-VL-7B-Instruct's real shapes with random weights, built on ``device``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = real.qwen2_5_vl_7b_config()
    if num_layers:
        config.text_config.num_hidden_layers = num_layers
    config._attn_implementation = attn
    torch.manual_seed(0)
    return real.build_on_device(Qwen2_5_VLForConditionalGeneration, config, dtype, device)


def _cpu(build: Callable[..., nn.Module]) -> Callable[[str, torch.dtype, str, int | None], nn.Module]:
    def made(attn: str, dtype: torch.dtype, device: str, num_layers: int | None) -> nn.Module:
        model = build(attn, dtype, num_layers) if num_layers else build(attn, dtype)
        return model.to(device)

    return made


def _gpu(build: Callable[..., nn.Module], default_layers: int | None
         ) -> Callable[[str, torch.dtype, str, int | None], nn.Module]:
    def made(attn: str, dtype: torch.dtype, device: str, num_layers: int | None) -> nn.Module:
        return build(attn, dtype, device, num_layers or default_layers)

    return made


SHAPES: dict[str, Shape] = {
    "miniature": Shape(_cpu(miniature_llava), "llava-image"),
    "llava-672": Shape(_cpu(lambda a, d, n=32: miniature_llava(a, d, n, image_px=672, hidden=256)), "llava-image",
                       image_px=672),
    "llava-next": Shape(_cpu(miniature_llava_next), "next-image", image_px=672),
    "qwen2.5-vl-1344": Shape(_cpu(miniature_qwen2_5_vl), "qwen-image", image_px=1344),
    "qwen2.5-vl-video": Shape(_cpu(miniature_qwen2_5_vl), "qwen-video", image_px=448, frames=32),
    "llava-onevision": Shape(_cpu(miniature_llava_onevision), "onevision-image", image_px=1152),
    "internvl-7-tiles": Shape(_cpu(miniature_internvl), "internvl-image", tiles=7),
    "qwen3-vl-1024": Shape(_cpu(miniature_qwen3_vl), "qwen-image", image_px=1024),
    "llava-1.5-7b": Shape(_gpu(random_llava15_7b, 32), "llava-image", cpu_miniature=False),
    "llava-next-7b": Shape(_gpu(random_llava_next_7b, 32), "next-image", image_px=672, cpu_miniature=False),
    "qwen2.5-vl-7b": Shape(_gpu(random_qwen2_5_vl_7b, None), "qwen-image", image_px=1344, cpu_miniature=False),
    "qwen2.5-vl-7b-video": Shape(_gpu(random_qwen2_5_vl_7b, None), "qwen-video", image_px=448, frames=32,
                                 cpu_miniature=False),
    "llava-onevision-7b": Shape(_gpu(random_llava_onevision_7b, 28), "onevision-image", image_px=1152,
                                cpu_miniature=False),
    "internvl3-8b": Shape(_gpu(random_internvl3_8b, 28), "internvl-image", tiles=7, cpu_miniature=False),
    "qwen3-vl-8b": Shape(_gpu(random_qwen3_vl_8b, 36), "qwen-image", image_px=1024, cpu_miniature=False),
}


# The input a real checkpoint of each family gets from the benchmark when --shapes is not given.
SHAPE_OF_MODEL_TYPE = {"llava": "miniature", "llava_next": "llava-next", "qwen2_vl": "qwen2.5-vl-1344",
                       "qwen2_5_vl": "qwen2.5-vl-1344", "llava_onevision": "llava-onevision",
                       "internvl": "internvl-7-tiles", "qwen3_vl": "qwen3-vl-1024", "qwen3_vl_moe": "qwen3-vl-1024"}


def visual_token_id(model: nn.Module, shape: Shape) -> int:
    cfg: Any = model.config
    return int(cfg.video_token_id if shape.visual == "qwen-video" else cfg.image_token_id)


def shape_inputs(model: nn.Module, shape: Shape, batch: int, text_tokens: int = 50) -> dict[str, torch.Tensor]:
    """Processor-like inputs: ``batch`` identical rows of text, one image (or video), text."""
    cfg: Any = model.config
    g = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    out: dict[str, torch.Tensor] = {}
    before: list[int] = []
    after: list[int] = []
    if shape.visual == "llava-image":
        n_visual = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        side = cfg.vision_config.image_size
        out["pixel_values"] = torch.randn(batch, 3, side, side, generator=g)
    elif shape.visual == "internvl-image":
        side = cfg.vision_config.image_size[0]
        out["pixel_values"] = torch.randn(batch * shape.tiles, 3, side, side, generator=g)
        n_visual = shape.tiles * int(cfg.image_seq_length)
        before, after = [VISION_START_ID], [VISION_END_ID]  # <img> ... </img>
    elif shape.visual in ("next-image", "onevision-image"):
        image_size_to_num_patches = anyres_patch_count("llava_next")
        size = (shape.image_px, shape.image_px)
        views = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        side = cfg.vision_config.image_size
        out["pixel_values"] = torch.randn(batch, views, 3, side, side, generator=g)
        out["image_sizes"] = torch.tensor([size] * batch)
        device = next(model.parameters()).device
        with torch.no_grad():  # the count the model itself makes (anyres grid, unpadding, newlines)
            feats = model.model.get_image_features(
                pixel_values=torch.zeros(1, views, 3, side, side, dtype=dtype, device=device),
                image_sizes=torch.tensor([size], device=device)).pooler_output
        n_visual = int(feats[0].shape[0])
    else:
        patch, merge = cfg.vision_config.patch_size, cfg.vision_config.spatial_merge_size
        side = shape.image_px // patch
        t = shape.frames // cfg.vision_config.temporal_patch_size if shape.visual == "qwen-video" else 1
        grid = (t, side, side)
        patch_dim = 3 * cfg.vision_config.temporal_patch_size * patch * patch
        key, grid_key = (("pixel_values_videos", "video_grid_thw") if shape.visual == "qwen-video"
                         else ("pixel_values", "image_grid_thw"))
        out[key] = torch.randn(batch * t * side * side, patch_dim, generator=g)
        out[grid_key] = torch.tensor([grid] * batch)
        n_visual = t * side * side // merge**2
        before, after = [int(cfg.vision_start_token_id)], [int(cfg.vision_end_token_id)]
    visual_id = visual_token_id(model, shape)
    text = torch.randint(10, 3900, (batch, text_tokens), generator=g)
    ids = torch.cat([text[:, :TEXT_BEFORE], torch.tensor([before] * batch, dtype=torch.long),
                     torch.full((batch, n_visual), visual_id), torch.tensor([after] * batch, dtype=torch.long),
                     text[:, TEXT_BEFORE:]], dim=1)
    out.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    if shape.visual.startswith("qwen"):
        kind = 2 if shape.visual == "qwen-video" else 1
        out["mm_token_type_ids"] = torch.where(ids == visual_id, kind, 0)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in out:
            out[key] = out[key].to(dtype)
    return out
