"""Tiny random models and inputs built from configs (no downloads), for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0


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

    ``image_size // patch_size`` squared visual tokens per image (336 / 14 gives LLaVA-1.5's 576).
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
    text = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        pad_token_id=PAD_TOKEN_ID,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config).eval()
    return model.to(dtype)


@dataclass
class Prompt:
    """Token ids of one prompt: text before the image(s), then images separated by text."""

    before: list[int]
    after: list[int]
    images: int = 1
    between: tuple[int, ...] = (7, 8)


def visual_tokens_per_image(model: LlavaForConditionalGeneration) -> int:
    vc = model.config.vision_config
    return int((vc.image_size // vc.patch_size) ** 2)


def make_batch(
    model: LlavaForConditionalGeneration,
    prompts: list[Prompt],
    *,
    seed: int = 0,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``pixel_values`` for LLaVA, padded like a processor.

    Text ids avoid the pad and image ids. Images are random.
    """
    n_img = visual_tokens_per_image(model)
    rows = []
    for p in prompts:
        ids = list(p.before)
        for j in range(p.images):
            if j:
                ids += list(p.between)
            ids += [IMAGE_TOKEN_ID] * n_img
        rows.append(ids + list(p.after))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    total_images = sum(p.images for p in prompts)
    pixel_values = torch.randn(total_images, 3, size, size, generator=g).to(model.dtype)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values}
