"""Adapter registry: ``config.model_type`` -> where the pieces of that architecture live.

Adding a model = one adapter file + one line in ``_ADAPTERS``.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, ModelParts
from .internvl import INTERNVL
from .llava import LLAVA, LLAVA_NEXT, LLAVA_ONEVISION
from .qwen_vl import QWEN2_5_VL, QWEN2_VL

_ADAPTERS: tuple[Adapter, ...] = (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_VL, QWEN2_5_VL, INTERNVL)
REGISTRY: dict[str, Adapter] = {t: a for a in _ADAPTERS for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def adapter_for(model: object) -> Adapter:
    """The adapter for ``model``, or a clear error naming what is supported."""
    supported = ", ".join(f"{a.name} [model_type={'/'.join(a.model_types)}]" for a in _ADAPTERS)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"pio_fvlm.wrap expects a HuggingFace vision-language model (torch.nn.Module); got "
            f"{type(model).__name__}. Supported: {supported}"
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in REGISTRY:
        what = f"model_type={model_type!r}" if model_type else "no HuggingFace config"
        raise ValueError(
            f"pio_fvlm prunes visual tokens of vision-language models; {type(model).__name__} "
            f"({what}) is not a supported one. Supported: {supported}"
        )
    return REGISTRY[model_type]


__all__ = ["Adapter", "ModelParts", "REGISTRY", "adapter_for", "supported_model_types"]
