"""LLaVA-1.5 and LLaVA-NeXT: CLIP tower, projector, Llama-family LM under ``model.language_model``."""

from __future__ import annotations

from functools import partial
from typing import Any

from .base import Adapter, language_model_parts


def _image_ids(config: Any) -> tuple[int, ...]:
    return (int(config.image_token_id),)


find_llava_parts = partial(language_model_parts, visual_ids=_image_ids)

LLAVA = Adapter(
    name="LLaVA-1.5 (LlavaForConditionalGeneration)",
    model_types=("llava",),
    find_parts=find_llava_parts,
)

# Anyres: base view + crops + newline tokens all carry image_token_id, so one image's tokens
# form one visual pool and the same parts apply.
LLAVA_NEXT = Adapter(
    name="LLaVA-NeXT (LlavaNextForConditionalGeneration)",
    model_types=("llava_next",),
    find_parts=find_llava_parts,
)
