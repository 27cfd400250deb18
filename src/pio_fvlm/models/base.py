"""What an architecture adapter tells the runtime: where the pieces of the model are."""

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


@dataclass(frozen=True)
class Adapter:
    """One supported architecture family.

    Attributes:
        name: a readable family name for messages and the README.
        model_types: ``config.model_type`` values this adapter handles.
        find_parts: ``model -> ModelParts``; raises ``ValueError`` with advice when the
            object is a part of the model rather than the ``*ForConditionalGeneration``.
        position_modes: the ``positions=`` settings that make sense for this family.
    """

    name: str
    model_types: tuple[str, ...]
    find_parts: Callable[[nn.Module], ModelParts]
    position_modes: tuple[str, ...] = ("keep", "compact")
