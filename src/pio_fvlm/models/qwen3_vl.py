"""Qwen3-VL and Qwen3-VL-MoE: Qwen's M-RoPE LM (interleaved axes, q/k norms) plus DeepStack.

DeepStack: the vision tower taps several of its blocks, and the language model adds those
features to the visual positions' hidden states after decoder layers 0, 1 and 2
(``Qwen3VLTextModel._deepstack_process(hidden_states, visual_pos_masks, embeds)``, with the
full-length (B, L) mask and one embedding row per visual position, batch-major). Pruning at
layer 1 or 2 shortens the sequence before the injections after layers 1 and 2: the stand-in
below gives each kept visual token the row of its own visual position and drops the rows of
the dropped tokens. The hidden state that enters the prune layer (what the probe and the NMS see)
already holds the injection made after the layer before it. Decode steps carry no DeepStack.
Image and video tokens form one visual pool; video frames are separate runs between timestamps.
The probe: the closed form for the dense model (q/k norms included), the autograd fast probe for
the mixture of experts (its experts run at the proxy positions only; each token is routed alone).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from ..compat import DEEPSTACK_METHOD
from .base import Adapter, language_model_parts


def _image_and_video_ids(config: Any) -> tuple[int, ...]:
    return (int(config.image_token_id), int(config.video_token_id))


class DeepStackOnKeptTokens:
    """Instance-level stand-in for ``_deepstack_process`` of a wrapped Qwen3-VL language model.

    Args:
        runtime: the wrap's :class:`~pio_fvlm.runtime.Runtime` (tells which stage the layer that
            just ran belongs to, and which full-sequence position each of its slots holds).
        language_model: the ``Qwen3VLTextModel`` whose method this stands in for.
    """

    def __init__(self, runtime: Any, language_model: nn.Module) -> None:
        self.runtime = runtime
        self.language_model = language_model

    def __call__(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                 visual_embeds: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, S, D), S <= L; visual_pos_masks: (B, L) bool of the full sequence;
        visual_embeds: (n_visual, D), one row per True of the mask, batch-major."""
        stage = self.runtime.stage_of_layer_that_ran()
        if stage is None or stage.full_index is None or stage.full_index.shape[1] != hidden_states.shape[1]:
            # full-length hidden states (before the prune layer, or scattered back after the last layer)
            own: Any = type(self.language_model)
            return getattr(own, DEEPSTACK_METHOD)(self.language_model, hidden_states, visual_pos_masks, visual_embeds)
        mask = visual_pos_masks.to(hidden_states.device)
        ordinal = mask.flatten().cumsum(0).view_as(mask) - 1  # (B, L): each visual position's embedding row
        slots = stage.full_index.clamp(min=0)  # (B, S) full-sequence position of each slot
        kept_visual = (stage.full_index >= 0) & mask.gather(1, slots)
        rows = ordinal.gather(1, slots)[kept_visual]
        out = hidden_states.clone()
        out[kept_visual] = out[kept_visual] + visual_embeds.to(out.device, out.dtype)[rows]
        return out


def deepstack_patches(model: nn.Module, runtime: Any) -> list[tuple[nn.Module, str, Any]]:
    """The stand-in, installed on the language model for the wrap's lifetime."""
    language_model: Any = model.model.language_model  # type: ignore[union-attr]
    return [(language_model, DEEPSTACK_METHOD, DeepStackOnKeptTokens(runtime, language_model))]


find_qwen3_vl_parts = partial(language_model_parts, visual_ids=_image_and_video_ids)

QWEN3_VL = Adapter(
    name="Qwen3-VL (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)",
    model_types=("qwen3_vl", "qwen3_vl_moe"),
    find_parts=find_qwen3_vl_parts,
    position_modes=("keep",),
    method_patches=deepstack_patches,
)
