"""Tiny random models and inputs built from configs (no downloads), for the tests.

``tiny_vlm(family)`` builds a random model of one supported family with the real class;
``make_batch(model, prompts)`` builds processor-like inputs (ids, padding mask, pixels, and the
family's extra tensors) for a list of :class:`Prompt`; ``split_batch`` takes one sample of such a
batch alone. Checkpoints with a processor are in ``tiny_checkpoints.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

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

from pio_fvlm.compat import anyres_patch_count
from pio_fvlm.models import REGISTRY
from pio_fvlm.viz import LAYOUTS

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
