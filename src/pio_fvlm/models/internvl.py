"""InternVL (HF ``InternVLForConditionalGeneration``, InternVL3 / 3.5 ``-hf`` checkpoints).

Each image is cut into 448-px tiles plus a thumbnail tile; after pixel shuffle every tile gives
256 tokens, back to back between ``<img>`` and ``</img>``, all with ``image_token_id`` (videos are
frames given as tiles, with the same id). The LM is Qwen2 (InternVL3) or Qwen3 (InternVL3.5, q/k
norms: the generic probe); positions are plain 1-D.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .base import Adapter, language_model_parts


def _image_ids(config: Any) -> tuple[int, ...]:
    return (int(config.image_token_id),)


INTERNVL = Adapter(
    name="InternVL (InternVLForConditionalGeneration)",
    model_types=("internvl",),
    find_parts=partial(language_model_parts, visual_ids=_image_ids),
)
