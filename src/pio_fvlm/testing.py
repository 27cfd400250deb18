"""Tiny random models and inputs built from configs (no downloads), for tests and benchmarks.

``tiny_vlm(family)`` builds a random model of one supported family with the real class;
``make_batch(model, prompts)`` builds processor-like inputs (ids, padding mask, pixels, and the
family's extra tensors) for a list of :class:`Prompt`; ``tiny_checkpoint(family, folder)`` saves a
tiny model with a matching processor, loadable like a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from .compat import anyres_patch_count, video_processor_internals
from .models import REGISTRY
from .viz import LAYOUTS

# Every registered family (config.model_type), and those whose prompts may hold videos: both
# follow the registry, so a newly registered family runs every test that loops over them (and
# fails where its tiny model or checkpoint is missing).
FAMILIES = tuple(REGISTRY)
VIDEO_FAMILIES = tuple(f for f in FAMILIES if f in LAYOUTS and LAYOUTS[f].videos is not None)
TIMESTAMP_ID = 6  # Qwen3-VL: a text token before each video frame (the processor writes "<t seconds>")
IMAGE_TOKEN_ID = 3
VIDEO_TOKEN_ID = 4
VISION_START_ID = 1
VISION_END_ID = 2
PAD_TOKEN_ID = 0

# Per family, the image sizes a Prompt's `size` picks from (different visual-token counts).
NEXT_IMAGE_SIZES = ((28, 28), (30, 60), (60, 60))  # (height, width) -> 1, 3 or 5 views
QWEN_IMAGE_GRIDS = ((1, 4, 4), (1, 4, 6), (1, 6, 6))  # (t, h, w) patches -> 4, 6, 9 tokens
QWEN_VIDEO_GRID = (2, 4, 4)  # 8 tokens
ONEVISION_VIDEO_FRAMES = 4  # pooled to one token each, then one newline: 5 tokens
INTERNVL_TILES = (1, 2, 3)  # tiles per image by Prompt.size (4 tokens each after pixel shuffle)


# llava-hf/llava-1.5-7b-hf's config.json values: CLIP-L/336 tower and Vicuna-7B language model.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)


def llava15_7b_config(text_layers: int = 32, vision_layers: int = 24) -> LlavaConfig:
    """LLaVA-1.5-7B's configuration (576 visual tokens, 32 x 4096 LM), optionally shallower."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**{**CLIP_L_336, "num_hidden_layers": vision_layers}),
        text_config=LlamaConfig(**{**VICUNA_7B, "num_hidden_layers": text_layers}),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def qwen2_5_vl_7b_config() -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct's configuration (config.json values): a 32-layer window-attention
    tower of width 1280 and a 28 x 3584 Qwen2 LM with 4 key-value heads."""
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                          "rope_theta": 1000000.0}),
        vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


# Qwen2-7B / Qwen2.5-7B widths: the language models of LLaVA-OneVision-7B and InternVL3-8B.
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6)


def llava_onevision_7b_config(text_layers: int = 28, vision_layers: int = 26) -> LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's configuration: SigLIP-so400m at 384 px (27 x 27 = 729
    tokens per view), anyres up to 9 crops, a 28 x 3584 Qwen2 LM; optionally shallower."""
    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=vision_layers, num_attention_heads=16, image_size=384, patch_size=14),
        text_config=dict(model_type="qwen2", **{**QWEN2_7B, "num_hidden_layers": text_layers}, vocab_size=152128,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        image_token_id=151646, video_token_id=151647, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )


def internvl3_8b_config(text_layers: int = 28, vision_layers: int = 24) -> InternVLConfig:
    """OpenGVLab/InternVL3-8B-hf's configuration: InternViT-300M at 448 px, pixel shuffle to 256 tokens
    per tile, a 28 x 3584 Qwen2.5 LM with tied embeddings; optionally shallower."""
    return InternVLConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                           num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", **{**QWEN2_7B, "num_hidden_layers": text_layers}, vocab_size=151674,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}),
        image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


def qwen3_vl_8b_config(text_layers: int = 36, vision_layers: int = 27) -> Any:
    """Qwen/Qwen3-VL-8B-Instruct's configuration: a 27-block tower (patch 16, 2 x 2 merge, DeepStack
    taps at blocks 8, 16, 24) and a 36 x 4096 Qwen3 LM (q/k norms, 8 KV heads, interleaved M-RoPE)."""
    from transformers import Qwen3VLConfig

    taps = [i for i in (8, 16, 24) if i < vision_layers] or [0]
    return Qwen3VLConfig(
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=text_layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                         max_position_embeddings=262144, rope_parameters={
                             "rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                             "rope_theta": 5000000.0}),
        vision_config=dict(depth=vision_layers, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           out_hidden_size=4096, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304, deepstack_visual_indexes=taps),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


def qwen3_vl_30b_a3b_config() -> Any:
    """Qwen/Qwen3-VL-30B-A3B-Instruct's configuration: the same tower, a 48 x 2048 Qwen3-MoE LM
    (128 experts, 8 per token, expert width 768)."""
    from transformers import Qwen3VLMoeConfig

    return Qwen3VLMoeConfig(
        text_config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                         num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                         rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True, "rope_theta": 5000000.0}),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=[8, 16, 24]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


def build_on_device(cls: type[nn.Module], config: object, dtype: torch.dtype, device: str) -> nn.Module:
    """``cls(config)`` in eval mode, its random weights created directly on ``device`` in ``dtype``
    (a 7B model in bf16 on a GPU without a CPU copy; ``"meta"`` for shapes only)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@contextmanager
def layer_lengths(model: nn.Module) -> Iterator[dict[int, int]]:
    """Records the sequence length each decoder layer of ``model.model.language_model`` receives
    (registered after pio_fvlm's hooks, so it sees what the layer really gets). Yields
    {layer index: length}, filled by the forward calls inside the block."""
    seen: dict[int, int] = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True
        )
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _text_config(num_layers: int, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
                 vocab_size: int) -> dict:
    return dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        pad_token_id=PAD_TOKEN_ID,
        max_position_embeddings=4096,
    )


def tiny_llava(
    *,
    image_size: int = 56,
    patch_size: int = 14,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 128,
    vision_hidden: int = 32,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A random ``LlavaForConditionalGeneration`` with LLaVA-1.5's structure, scaled down.

    ``(image_size // patch_size) ** 2`` visual tokens per image (336 / 14 gives LLaVA-1.5's 576).
    """
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(**_text_config(num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, vocab_size))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    return LlavaForConditionalGeneration(config).eval().to(dtype)


def tiny_vlm(
    family: str,
    *,
    num_layers: int = 4,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """A random model of ``family`` (one of :data:`FAMILIES`) with the real HF class."""
    if family == "llava":
        return tiny_llava(num_layers=num_layers, attn_implementation=attn_implementation, dtype=dtype, seed=seed)
    torch.manual_seed(seed)
    text = _text_config(num_layers, 64, 128, 4, 2, 128)
    if family == "llava_next":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14, projection_dim=32)
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_id=IMAGE_TOKEN_ID,
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        cls: type[nn.Module] = LlavaNextForConditionalGeneration
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        text["bos_token_id"] = text["eos_token_id"] = None
        vision = dict(depth=1, embed_dim=32, num_heads=2, in_chans=3, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, intermediate_size=64)
        if family == "qwen2_vl":
            vision["hidden_size"] = 64  # Qwen2-VL: hidden_size is the merger's output width
            config_cls, cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        else:
            vision.update(hidden_size=32, out_hidden_size=64, fullatt_block_indexes=[0], window_size=56)
            config_cls, cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        config = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                            video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                            vision_end_token_id=VISION_END_ID)
    elif family in ("qwen3_vl", "qwen3_vl_moe"):
        from transformers import (
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
            Qwen3VLMoeConfig,
            Qwen3VLMoeForConditionalGeneration,
        )

        text.update(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                   "mrope_interleaved": True, "rope_theta": 10000.0})
        if family == "qwen3_vl_moe":  # 4 experts, 2 per token
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        # DeepStack taps: after decoder layers 0, 1 and 2 the tower's blocks 0, 1, 2 are added
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1, 2])
        config_cls, cls = ((Qwen3VLConfig, Qwen3VLForConditionalGeneration) if family == "qwen3_vl"
                           else (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration))
        config = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                            video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                            vision_end_token_id=VISION_END_ID)
    elif family == "llava_onevision":
        from transformers import Qwen2Config, SiglipVisionConfig

        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        config = LlavaOnevisionConfig(
            vision_config=vision, text_config=Qwen2Config(**text), image_token_id=IMAGE_TOKEN_ID,
            video_token_id=VIDEO_TOKEN_ID, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
            vision_feature_layer=-1, vision_feature_select_strategy="full",
        )
        cls = LlavaOnevisionForConditionalGeneration
    elif family == "internvl":
        from transformers import InternVLVisionConfig, Qwen2Config

        vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=[56, 56], patch_size=[14, 14])
        config = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**text), image_token_id=IMAGE_TOKEN_ID,
                                image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1)
        cls = InternVLForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    config._attn_implementation = attn_implementation
    return cls(config).eval().to(dtype)


@dataclass
class Prompt:
    """One prompt: text ids before the visual inputs, then images (and videos), then text.

    ``size`` picks a per-family image size, so samples can hold different visual counts
    (LLaVA-1.5 has one size only). ``videos`` applies to Qwen families.
    """

    before: list[int]
    after: list[int]
    images: int = 1
    size: int = 0
    videos: int = 0
    between: tuple[int, ...] = (7, 8)


def visual_tokens_per_image(model: nn.Module) -> int:
    """LLaVA-1.5 only: tokens of one image."""
    vc = model.config.vision_config
    return int((vc.image_size // vc.patch_size) ** 2)


def _llava_next_counts(model: nn.Module, sizes: list[tuple[int, int]]) -> list[int]:
    image_size_to_num_patches = anyres_patch_count("llava_next")
    cfg = model.config
    views = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
    side = cfg.vision_config.image_size
    pv = torch.zeros(len(sizes), max(views), 3, side, side, dtype=model.dtype)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pv, image_sizes=torch.tensor(sizes)).pooler_output
    return [int(f.shape[0]) for f in feats]


def _onevision_pixels(model: nn.Module, prompts: list[Prompt], g: torch.Generator,
                      out: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """LLaVA-OneVision pixels into ``out``; tokens per image and per video, from the model itself.
    A prompt with one image gets anyres views (``Prompt.size``), one with several gets base views
    only (as the processor does: ``batch_num_images``)."""
    cfg = model.config
    side = cfg.vision_config.image_size
    sizes = [NEXT_IMAGE_SIZES[p.size] for p in prompts for _ in range(p.images)]
    per_prompt = [p.images for p in prompts if p.images]
    counts: list[int] = []
    if sizes:
        image_size_to_num_patches = anyres_patch_count("llava_onevision")

        anyres = [n == 1 for n in per_prompt for _ in range(n)]
        views = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, side) if a else 1
                 for s, a in zip(sizes, anyres)]
        out["pixel_values"] = torch.randn(len(sizes), max(views), 3, side, side, generator=g)
        out["image_sizes"] = torch.tensor(sizes)
        out["batch_num_images"] = torch.tensor(per_prompt)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=out["pixel_values"].to(model.dtype),
                                                   image_sizes=out["image_sizes"],
                                                   batch_num_images=out["batch_num_images"]).pooler_output
        counts = [int(f.shape[0]) for f in feats]
    n_videos = sum(p.videos for p in prompts)
    if not n_videos:
        return counts, []
    frames = torch.randn(n_videos, ONEVISION_VIDEO_FRAMES, 3, side, side, generator=g)
    out["pixel_values_videos"] = frames
    with torch.no_grad():
        per_video = model.model.get_video_features(pixel_values_videos=frames[:1].to(model.dtype)).pooler_output
    return counts, [int(per_video.shape[1])] * n_videos


def make_batch(
    model: nn.Module,
    prompts: list[Prompt],
    *,
    seed: int = 0,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Processor-like inputs for ``model`` (any family of :data:`FAMILIES`), padded.

    Text ids avoid the pad and special ids. Pixels are random (seeded).
    """
    family = model.config.model_type
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    rows: list[list[int]] = []
    types: list[list[int]] = []  # 0 text, 1 image, 2 video (Qwen's mm_token_type_ids)

    def add(ids: list[int], row: list[int], kind: list[int], k: int) -> None:
        row.extend(ids)
        kind.extend([k] * len(ids))

    video_counts: list[int] = []
    if family == "llava":
        n_img = visual_tokens_per_image(model)
        side = model.config.vision_config.image_size
        counts = [n_img] * sum(p.images for p in prompts)
        out["pixel_values"] = torch.randn(len(counts), 3, side, side, generator=g)
    elif family == "llava_next":
        sizes = [NEXT_IMAGE_SIZES[p.size] for p in prompts for _ in range(p.images)]
        counts = _llava_next_counts(model, sizes)
        image_size_to_num_patches = anyres_patch_count("llava_next")
        cfg = model.config
        views = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
        side = cfg.vision_config.image_size
        out["pixel_values"] = torch.randn(len(sizes), max(views), 3, side, side, generator=g)
        out["image_sizes"] = torch.tensor(sizes)
    elif family == "llava_onevision":
        counts, video_counts = _onevision_pixels(model, prompts, g, out)
    elif family == "internvl":
        tiles = [INTERNVL_TILES[p.size] for p in prompts for _ in range(p.images)]
        side = model.config.vision_config.image_size[0]
        counts = [t * model.config.image_seq_length for t in tiles]
        if tiles:
            out["pixel_values"] = torch.randn(sum(tiles), 3, side, side, generator=g)
    else:
        grids = [QWEN_IMAGE_GRIDS[p.size] for p in prompts for _ in range(p.images)]
        merge = model.config.vision_config.spatial_merge_size ** 2
        counts = [t * h * w // merge for t, h, w in grids]
        patch = model.config.vision_config.patch_size
        patch_dim = 3 * 2 * patch * patch
        if grids:
            out["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in grids), patch_dim, generator=g)
            out["image_grid_thw"] = torch.tensor(grids)
        n_videos = sum(p.videos for p in prompts)
        if n_videos:
            t, h, w = QWEN_VIDEO_GRID
            out["pixel_values_videos"] = torch.randn(n_videos * t * h * w, patch_dim, generator=g)
            out["video_grid_thw"] = torch.tensor([QWEN_VIDEO_GRID] * n_videos)
    image_counts, videos = iter(counts), iter(video_counts)
    for p in prompts:
        row: list[int] = []
        kind: list[int] = []
        add(list(p.before), row, kind, 0)
        for j in range(p.images):
            if j:
                add(list(p.between), row, kind, 0)
            n = next(image_counts)
            if family.startswith("qwen") or family == "internvl":  # <vision_start> / <img> ... end
                add([VISION_START_ID], row, kind, 0)
                add([IMAGE_TOKEN_ID] * n, row, kind, 1)
                add([VISION_END_ID], row, kind, 0)
            else:
                add([IMAGE_TOKEN_ID] * n, row, kind, 1)
        for _ in range(p.videos):
            if family == "llava_onevision":
                add([VIDEO_TOKEN_ID] * next(videos), row, kind, 2)
                continue
            t, h, w = QWEN_VIDEO_GRID
            if family.startswith("qwen3_vl"):  # one run per frame, each after its timestamp
                for _ in range(t):
                    add([TIMESTAMP_ID, VISION_START_ID], row, kind, 0)
                    add([VIDEO_TOKEN_ID] * (h * w // 4), row, kind, 2)
                    add([VISION_END_ID], row, kind, 0)
                continue
            add([VISION_START_ID], row, kind, 0)
            add([VIDEO_TOKEN_ID] * (t * h * w // 4), row, kind, 2)
            add([VISION_END_ID], row, kind, 0)
        add(list(p.after), row, kind, 0)
        rows.append(row)
        types.append(kind)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    token_types = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (r, k) in enumerate(zip(rows, types)):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
        token_types[i, sl] = torch.tensor(k)
    out.update(input_ids=input_ids, attention_mask=mask)
    if family.startswith("qwen"):
        out["mm_token_type_ids"] = token_types
    for key in ("pixel_values", "pixel_values_videos"):
        if key in out:
            out[key] = out[key].to(model.dtype)
    return out


def split_batch(model: nn.Module, prompts: list[Prompt], batch: dict[str, torch.Tensor], i: int,
                padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Sample ``i`` of a batch made by :func:`make_batch`, alone and unpadded, with the same pixels."""
    alone = make_batch(model, [prompts[i]], padding_side=padding_side)
    family = model.config.model_type
    before = prompts[:i]
    if family == "llava_onevision":
        start, n = sum(p.images for p in before), prompts[i].images
        if n:
            alone["pixel_values"] = batch["pixel_values"][start : start + n, : alone["pixel_values"].shape[1]]
        start, n = sum(p.videos for p in before), prompts[i].videos
        if n:
            alone["pixel_values_videos"] = batch["pixel_values_videos"][start : start + n]
        return alone
    if family == "internvl":
        tiles = [INTERNVL_TILES[p.size] for p in before for _ in range(p.images)]
        mine = [INTERNVL_TILES[prompts[i].size]] * prompts[i].images
        if mine:
            alone["pixel_values"] = batch["pixel_values"][sum(tiles) : sum(tiles) + sum(mine)]
        return alone
    if family in ("llava", "llava_next"):
        start = sum(p.images for p in before)
        alone["pixel_values"] = batch["pixel_values"][start : start + prompts[i].images]
        if family == "llava_next":
            n_views = alone["pixel_values"].shape[1]
            alone["pixel_values"] = alone["pixel_values"][:, :n_views]
        return alone
    for kind, grid_key, pix_key in (("images", "image_grid_thw", "pixel_values"),
                                    ("videos", "video_grid_thw", "pixel_values_videos")):
        if grid_key not in batch:
            continue
        grids = batch[grid_key]
        start = sum(getattr(p, kind) for p in before)
        stop = start + getattr(prompts[i], kind)
        rows_before = int(grids[:start].prod(-1).sum())
        rows_mine = int(grids[start:stop].prod(-1).sum())
        if stop > start:
            alone[pix_key] = batch[pix_key][rows_before : rows_before + rows_mine]
    return alone


# --- checkpoints with a processor ----------------------------------------------------------------

# What each family's processor writes at the ids the tiny models use: (vision start, vision end,
# image, video). Unused slots get placeholder names.
CHECKPOINT_SPECIAL_TOKENS = {
    "llava": ("<unused1>", "<unused2>", "<image>", "<unused4>"),
    "llava_next": ("<unused1>", "<unused2>", "<image>", "<unused4>"),
    "llava_onevision": ("<unused1>", "<unused2>", "<image>", "<video>"),
    "qwen2_vl": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "qwen2_5_vl": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "qwen3_vl": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "qwen3_vl_moe": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "internvl": ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
}
# The text the chat template writes for one image part (the processor expands it).
CHECKPOINT_IMAGE_MARKUP = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl_moe": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>",
}
CHAT_USER, CHAT_ASSISTANT = "USER:", "ASSISTANT:"  # the chat template's turn markers (words of the vocabulary)
CHECKPOINT_WORDS = 100  # plain words "w0" ... "w99" follow the special tokens and the markers


def checkpoint_chat_template(family: str) -> str:
    """A one-line chat template: ``USER: <image markup> TEXT ASSISTANT:`` (each image part becomes
    the family's markup and a space; each assistant turn `` ASSISTANT: TEXT ``)."""
    markup = CHECKPOINT_IMAGE_MARKUP.get(family, "<image>")
    return (
        "{%- for message in messages -%}"
        f"{{{{ '{CHAT_USER} ' if message['role'] == 'user' else ' {CHAT_ASSISTANT} ' }}}}"
        "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
        "{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{ '{markup} ' }}}}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ ' {CHAT_ASSISTANT}' }}}}{{%- endif -%}}"
    )


def _no_video_processor() -> Any:
    """A video processor that handles no videos: it needs no torchvision (the real ones do)."""
    _, VideoProcessorMixin, _ = video_processor_internals()

    class NoVideoProcessor(VideoProcessorMixin):
        """Stands in for the family's video processor: image requests only."""

    return NoVideoProcessor()


@contextmanager
def images_only_processors() -> Iterator[None]:
    """Inside the block, processors that own a video processor (Qwen-VL, LLaVA-OneVision, InternVL)
    can be built and loaded by ``AutoProcessor`` with a stand-in that handles no videos.

    Without torchvision transformers can neither build these processors (checking the video
    processor's class looks it up in a torchvision-only mapping: ``AttributeError: type object
    'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'``) nor load them
    (``AutoVideoProcessor``: ``ValueError: ... requires `torchvision` to be installed``). The block
    lets an image-processor object pass that class check and makes ``AutoVideoProcessor`` return
    the stand-in; tokenizer, image processor and processor class load as for a real checkpoint.
    Used with torchvision too, so that the checkpoints are the same everywhere.
    """
    pu, _, AutoVideoProcessor = video_processor_internals()  # the real class, not a dummy

    base = pu.MODALITY_TO_BASE_CLASS_MAPPING["video_processor"]
    loader = AutoVideoProcessor.__dict__["from_pretrained"]
    pu.MODALITY_TO_BASE_CLASS_MAPPING["video_processor"] = "ImageProcessingMixin"
    AutoVideoProcessor.from_pretrained = classmethod(lambda cls, *args, **kwargs: _no_video_processor())
    try:
        yield
    finally:
        pu.MODALITY_TO_BASE_CLASS_MAPPING["video_processor"] = base
        AutoVideoProcessor.from_pretrained = loader


def _checkpoint_tokenizer(family: str) -> Any:
    """A whitespace word-level tokenizer whose special tokens sit at the tiny models' ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    start, end, image, video = CHECKPOINT_SPECIAL_TOKENS[family]
    fixed = {"<pad>": PAD_TOKEN_ID, start: VISION_START_ID, end: VISION_END_ID, image: IMAGE_TOKEN_ID,
             video: VIDEO_TOKEN_ID}
    names = ["<unk>", CHAT_USER, CHAT_ASSISTANT] + [f"w{i}" for i in range(CHECKPOINT_WORDS)]
    free = (i for i in range(1000) if i not in fixed.values())
    vocab = {**fixed, **{name: next(free) for name in names}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = {"start_image_token": start, "end_image_token": end, "context_image_token": image,
             "video_token": video} if family == "internvl" else {}  # InternVLProcessor reads these attributes
    # right padding, transformers' default: batched generation must set left padding itself
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        padding_side="right", extra_special_tokens=named)
    tokenizer.add_special_tokens({"additional_special_tokens": [start, end, image, video]})
    return tokenizer


def _checkpoint_processor(family: str, model: nn.Module) -> Any:
    """The family's processor (PIL image processor) sized for ``model``'s vision tower."""
    import transformers as tf

    tokenizer = _checkpoint_tokenizer(family)
    vision = model.config.vision_config
    template = checkpoint_chat_template(family)
    pinpoints = getattr(model.config, "image_grid_pinpoints", None)
    if family == "llava":
        side = vision.image_size  # CLIP: resize the short side, centre crop: one view, (side / patch)^2 tokens
        images = tf.CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return tf.LlavaProcessor(images, tokenizer, patch_size=vision.patch_size, chat_template=template,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava_next":  # anyres: a base view plus the crops of the best pinpoint
        side = vision.image_size
        images = tf.LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                               image_grid_pinpoints=pinpoints)
        return tf.LlavaNextProcessor(images, tokenizer, patch_size=vision.patch_size, chat_template=template,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava_onevision":
        side = vision.image_size
        images = tf.LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                    image_grid_pinpoints=pinpoints)
        return tf.LlavaOnevisionProcessor(images, tokenizer, _no_video_processor(), chat_template=template,
                                          num_image_tokens=(side // vision.patch_size) ** 2,
                                          vision_feature_select_strategy="full")
    if family == "internvl":  # tiles of the tower's size (up to 3, plus a thumbnail when more than one)
        side = vision.image_size[0]
        images = tf.GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=True,
                                             min_patches=1, max_patches=3)
        return tf.InternVLProcessor(images, tokenizer, _no_video_processor(), chat_template=template,
                                    image_seq_length=model.config.image_seq_length)
    # Qwen-VL: resized to multiples of patch * merge with 4 x 4 to 8 x 8 patches (4 to 16 tokens);
    # "shortest_edge" / "longest_edge" are the least and most pixels
    unit = vision.patch_size
    mean_std = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family.startswith("qwen3_vl") else {}
    images = tf.Qwen2VLImageProcessorPil(patch_size=unit, merge_size=vision.spatial_merge_size,
                                         temporal_patch_size=vision.temporal_patch_size,
                                         size={"shortest_edge": (4 * unit) ** 2, "longest_edge": (8 * unit) ** 2},
                                         **mean_std)
    cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
           "qwen3_vl": tf.Qwen3VLProcessor, "qwen3_vl_moe": tf.Qwen3VLProcessor}[family]
    return cls(images, tokenizer, _no_video_processor(), chat_template=template)


def tiny_checkpoint(family: str, folder: str | Path, *, num_layers: int = 4, seed: int = 0) -> Path:
    """Saves ``tiny_vlm(family)`` and a matching processor into ``folder`` (created); returns it.

    ``AutoModelForImageTextToText`` and ``AutoProcessor`` load the folder like a real checkpoint
    (load the processor inside :func:`images_only_processors`). The tokenizer splits on
    whitespace: special tokens at the model's ids (:data:`CHECKPOINT_SPECIAL_TOKENS`), ``USER:``,
    ``ASSISTANT:``, words ``w0`` ... ``w99``. The chat template is
    :func:`checkpoint_chat_template`; the PIL image processor gives pixels the tower takes, and
    images of other sizes give other visual-token counts (except LLaVA-1.5: one view). The language
    model's query and key weights are scaled by 10: at the default initialisation every query
    attends almost uniformly, so answers would hardly depend on positions or on the tokens kept.
    """
    folder = Path(folder)
    model = tiny_vlm(family, num_layers=num_layers, seed=seed)
    with torch.no_grad():
        for name, weight in model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(10.0)
    with images_only_processors():
        processor = _checkpoint_processor(family, model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
