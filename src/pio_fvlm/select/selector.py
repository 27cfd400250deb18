"""The selector interface (PIO-FVLM and any other way to choose visual tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..config import PruneConfig
from .capture import captured_saliency
from .closed_form import closed_form_saliency
from .nms import select_with_nms
from .saliency import ProbeInputs, ProbeModules, fast_saliency, full_layer_saliency

ProbeKind = Literal["captured", "closed_form", "fast", "full"]
PROBES = {
    "captured": captured_saliency,
    "closed_form": closed_form_saliency,
    "fast": fast_saliency,
    "full": full_layer_saliency,
}


@dataclass
class SelectionRequest:
    """Everything a selector may use to choose, for one prune stage of one batch.

    Attributes:
        probe_inputs: hidden states (B, S, D), validity, proxy positions and the layer's kwargs.
        probe_modules: the prune layer, final norm and prediction head.
        candidates: (B, S) bool, the visual tokens that may be kept or dropped.
        budgets: (B,) long, how many candidates each row keeps (<= its candidate count).
        config: the wrap's settings.
        probe: how the saliency is computed: ``"closed_form"`` (no autograd, see
            :mod:`.closed_form`), ``"captured"`` (the same, compiled: :mod:`.capture`), ``"fast"``
            (autograd at the proxy positions only) or ``"full"`` (autograd through the real layer);
            all give the same saliency.
        candidate_counts: per row, the number of candidates, known on the host.
        budget_counts: ``budgets`` on the host.
    """

    probe_inputs: ProbeInputs
    probe_modules: ProbeModules
    candidates: torch.Tensor
    budgets: torch.Tensor
    config: PruneConfig
    probe: ProbeKind
    candidate_counts: list[int] | None = None
    budget_counts: list[int] | None = None


class Selector(Protocol):
    """Returns a (B, S) bool mask with exactly ``budgets[b]`` candidates set in row b, or that
    mask and (B, S, D) replacement hidden states for the stage's input (merging selectors)."""

    def __call__(self, request: SelectionRequest) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


class PioSelector:
    """PIO-FVLM: gradient saliency of the layer-local proxy loss, then NMS to the budget."""

    def saliency(self, request: SelectionRequest) -> torch.Tensor:
        """(B, S) fp32 saliency, by the cheapest exact probe the layer allows."""
        probe = PROBES[request.probe]
        return probe(request.probe_modules, request.probe_inputs)

    def __call__(self, request: SelectionRequest) -> torch.Tensor:
        saliency = self.saliency(request)
        return select_with_nms(
            saliency,
            request.probe_inputs.hidden,
            request.candidates,
            request.budgets,
            request.config.nms_threshold,
            request.candidate_counts,
            request.budget_counts,
        )
