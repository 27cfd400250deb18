"""What an architecture adapter tells the runtime: where the pieces of the model are.

This package imports nothing of ``pio_fvlm`` but :mod:`pio_fvlm.compat`: the rest of the
library reads it, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelParts:
    """The modules and ids pruning needs, found once at ``wrap`` time.

    Attributes:
        base: the module whose forward receives ``input_ids`` for the whole VLM (it is hooked
            to learn, per call, where the visual tokens are).
        layers: the language model's decoder layers.
        norm: the final norm before the head.
        head: the prediction head (``lm_head``).
        rotary: the language model's rotary-embedding module, ``rotary(x, position_ids)``.
        text_config: the language model's config (attention implementation, layer count).
        visual_token_ids: placeholder ids whose positions hold visual features.
    """

    base: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module
    text_config: Any
    visual_token_ids: tuple[int, ...]


def language_model_parts(model: nn.Module, visual_ids: Callable[[Any], tuple[int, ...]]) -> ModelParts:
    """Parts of the common HF layout: ``model.model.language_model`` (layers, norm, rotary) and
    ``model.lm_head``; ``visual_ids(config)`` names the visual placeholder ids."""
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
        visual_token_ids=visual_ids(vlm.config),
    )


@dataclass(frozen=True)
class Adapter:
    """One supported architecture family.

    Attributes:
        name: a readable family name for messages and the README.
        model_types: ``config.model_type`` values this adapter handles.
        find_parts: ``model -> ModelParts``; raises ``ValueError`` with advice when the
            object is a part of the model rather than the ``*ForConditionalGeneration``.
        position_modes: the ``positions=`` settings that make sense for this family.
        method_patches: ``(model, runtime) -> [(module, method name, stand-in), ...]``: methods of
            the model that must follow the pruning (installed on the instance by ``wrap``,
            removed by ``unwrap``), or None.

    What else a family has lives with the code that uses it, in maps by model type: its encoder
    mode in :data:`pio_fvlm.encoder.ENCODER_MODES` (or the reason it has none), its picture layout
    in :data:`pio_fvlm.viz.LAYOUTS`.
    """

    name: str
    model_types: tuple[str, ...]
    find_parts: Callable[[nn.Module], ModelParts]
    position_modes: tuple[str, ...] = ("keep", "compact")
    method_patches: Callable[[nn.Module, Any], list[tuple[nn.Module, str, Any]]] | None = None
