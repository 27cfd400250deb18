"""Qwen2-VL and Qwen2.5-VL: M-RoPE language model; image and video tokens form the visual pool.

Kept tokens keep their 3-D (t, h, w) rotary positions (the authors' Qwen2.5-VL code does the
same); decode positions come from the model's ``rope_deltas`` and the unpruned layers' cache
length, so they stay right. ``positions="compact"`` is refused: the decoder layers never see
the 3-D position ids, and renumbering M-RoPE positions has no single sensible meaning.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .base import Adapter, language_model_parts


def _image_and_video_ids(config: Any) -> tuple[int, ...]:
    return (int(config.image_token_id), int(config.video_token_id))


find_qwen_vl_parts = partial(language_model_parts, visual_ids=_image_and_video_ids)

QWEN2_VL = Adapter(
    name="Qwen2-VL (Qwen2VLForConditionalGeneration)",
    model_types=("qwen2_vl",),
    find_parts=find_qwen_vl_parts,
    position_modes=("keep",),
)
QWEN2_5_VL = Adapter(
    name="Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)",
    model_types=("qwen2_5_vl",),
    find_parts=find_qwen_vl_parts,
    position_modes=("keep",),
)
