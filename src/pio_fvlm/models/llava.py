"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: a vision tower, a projector, and a Llama- or
Qwen2-family LM under ``model.language_model``; plain 1-D positions."""

from __future__ import annotations

from functools import partial
from typing import Any

from .base import Adapter, language_model_parts


def _image_ids(config: Any) -> tuple[int, ...]:
    return (int(config.image_token_id),)


def _image_and_video_ids(config: Any) -> tuple[int, ...]:
    return (int(config.image_token_id), int(config.video_token_id))


find_llava_parts = partial(language_model_parts, visual_ids=_image_ids)

LLAVA = Adapter(
    name="LLaVA-1.5 (LlavaForConditionalGeneration)",
    model_types=("llava",),
    find_parts=find_llava_parts,
)

# Anyres: base view + crops + newline tokens all carry image_token_id, so one image's tokens
# form one visual pool and the same parts apply. The learned newline vectors are candidates like
# any visual token and count in the budget: every placeholder position is scored and chosen the
# same way, so the pruned layers hold exactly the budget of visual positions the user asked for
# (kept tokens keep their original positions either way).
LLAVA_NEXT = Adapter(
    name="LLaVA-NeXT (LlavaNextForConditionalGeneration)",
    model_types=("llava_next",),
    find_parts=find_llava_parts,
)

# Images through anyres (up to 9 crops + base view, unpadded, a newline per row), videos as pooled
# frames with one newline after each video. Image and video tokens of a prompt form one pool;
# newlines are candidates and count in the budget, as for LLaVA-NeXT.
LLAVA_ONEVISION = Adapter(
    name="LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)",
    model_types=("llava_onevision",),
    find_parts=partial(language_model_parts, visual_ids=_image_and_video_ids),
)
