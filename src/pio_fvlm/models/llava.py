"""LLaVA-1.5 and LLaVA-NeXT: CLIP tower, projector, Llama-family LM under ``model.language_model``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Adapter, ModelParts


def find_llava_parts(model: nn.Module) -> ModelParts:
    vlm: Any = model  # HF models: attributes are dynamic
    inner: Any = getattr(vlm, "model", None)
    lm = getattr(inner, "language_model", None)
    head = getattr(vlm, "lm_head", None)
    if lm is None or head is None:
        raise ValueError(
            f"{type(model).__name__} has no `model.language_model` and `lm_head`: wrap the whole "
            f"*ForConditionalGeneration model (the object `from_pretrained` returns), not a part of it"
        )
    return ModelParts(
        base=inner,
        layers=lm.layers,
        norm=lm.norm,
        head=head,
        rotary=lm.rotary_emb,
        text_config=vlm.config.text_config,
        visual_token_ids=(int(vlm.config.image_token_id),),
    )


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
