"""Qwen2-VL and Qwen2.5-VL: M-RoPE language model; image and video tokens form the visual pool.

Kept tokens keep their 3-D (t, h, w) rotary positions (the authors' Qwen2.5-VL code does the
same); decode positions come from the model's ``rope_deltas`` and the unpruned layers' cache
length, so they stay right. ``positions="compact"`` is refused: the decoder layers never see
the 3-D position ids, and renumbering M-RoPE positions has no single sensible meaning.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Adapter, ModelParts


def find_qwen_vl_parts(model: nn.Module) -> ModelParts:
    vlm: Any = model  # HF models: attributes are dynamic
    inner: Any = getattr(vlm, "model", None)
    lm = getattr(inner, "language_model", None)
    head = getattr(vlm, "lm_head", None)
    if lm is None or head is None:
        raise ValueError(
            f"{type(model).__name__} has no `model.language_model` and `lm_head`: wrap the whole "
            f"Qwen2(.5)-VL *ForConditionalGeneration model, not a part of it"
        )
    cfg = vlm.config
    return ModelParts(
        base=inner,
        layers=lm.layers,
        norm=lm.norm,
        head=head,
        rotary=lm.rotary_emb,
        text_config=cfg.text_config,
        visual_token_ids=(int(cfg.image_token_id), int(cfg.video_token_id)),
    )


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
