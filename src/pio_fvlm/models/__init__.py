"""Adapter registry: ``config.model_type`` -> where the pieces of that architecture live.

Adding a model: see docs/adding-a-model.md (an adapter here, a line in ``_ADAPTERS``, and the
family's lines in the encoder and picture maps).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, ModelParts
from .internvl import INTERNVL
from .llava import LLAVA, LLAVA_NEXT, LLAVA_ONEVISION
from .qwen3_vl import QWEN3_VL
from .qwen_vl import QWEN2_5_VL, QWEN2_VL

_ADAPTERS: tuple[Adapter, ...] = (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, INTERNVL)
REGISTRY: dict[str, Adapter] = {t: a for a in _ADAPTERS for t in a.model_types}

# Families people ask about that pruning here cannot serve as they are, and why.
_BIDIRECTIONAL = ("its image tokens attend to each other in both directions (a non-causal block in the "
                  "attention mask), which the pruned layers' masks here do not reproduce")
NOT_SUPPORTED: dict[str, str] = {
    "qwen3_5": "Qwen3.5's linear-attention layers keep one recurrent state for the whole sequence instead of a "
               "per-token KV cache, so tokens cannot be dropped from them",
    "qwen3_5_moe": "Qwen3.5's linear-attention layers keep one recurrent state for the whole sequence instead of "
                   "a per-token KV cache, so tokens cannot be dropped from them",
    "gemma3": _BIDIRECTIONAL,
    "paligemma": _BIDIRECTIONAL,
    "mllama": "Llama 3.2 Vision reads the image through cross-attention layers: the visual tokens are not in "
              "the language model's sequence, so there is nothing there to prune",
}


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
    if model_type in NOT_SUPPORTED:
        raise ValueError(
            f"pio_fvlm cannot prune {type(model).__name__} (model_type={model_type!r}): "
            f"{NOT_SUPPORTED[model_type]}. Supported: {supported}"
        )
    if model_type not in REGISTRY:
        what = f"model_type={model_type!r}" if model_type else "no HuggingFace config"
        raise ValueError(
            f"pio_fvlm prunes visual tokens of vision-language models; {type(model).__name__} "
            f"({what}) is not a supported one. Supported: {supported}"
        )
    return REGISTRY[model_type]


def visual_token_counts(model: nn.Module, input_ids: torch.Tensor) -> list[int]:
    """Visual tokens per row of (B, L) ``input_ids``, by the ids the family's adapter names (the
    ids the runtime prunes: images, videos, newline vectors that share the image id)."""
    ids = torch.tensor(adapter_for(model).find_parts(model).visual_token_ids, device=input_ids.device)
    return [int(n) for n in torch.isin(input_ids, ids).sum(1).tolist()]


__all__ = ["Adapter", "ModelParts", "NOT_SUPPORTED", "REGISTRY", "adapter_for", "supported_model_types",
           "visual_token_counts"]
