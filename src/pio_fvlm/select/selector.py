"""The selector interface (PIO-FVLM and any other way to choose visual tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..config import PruneConfig, check_flag, check_nms_threshold, check_proxy_tokens, plain_number
from .capture import captured_saliency
from .closed_form import closed_form_saliency
from .nms import select_with_nms
from .saliency import ProbeInputs, ProbeModules, fast_saliency, full_layer_saliency

ProbeKind = Literal["captured", "closed_form", "fast", "full"]
ProbeChoice = Literal["auto", "captured", "closed_form", "fast", "full"]
PROBE_CHOICES: tuple[str, ...] = ("auto", "captured", "closed_form", "fast", "full")
PROBES = {
    "captured": captured_saliency,
    "closed_form": closed_form_saliency,
    "fast": fast_saliency,
    "full": full_layer_saliency,
}


@dataclass(frozen=True)
class ProxyWindow:
    """The prompt positions whose predictions form the proxy loss, per row: ``tokens`` positions
    ending just before the last real token (``includes_last=False``, the authors' code) or at it.
    A selector names the window it reads as its ``proxy`` attribute; the runtime builds it."""

    tokens: int = 4
    includes_last: bool = False

    def prompt_tokens_needed(self) -> int:
        """The shortest prompt that has this window."""
        return self.tokens + (0 if self.includes_last else 1)


@dataclass
class SelectionRequest:
    """Everything a selector may use to choose, for one prune stage of one batch.

    Attributes:
        probe_inputs: hidden states (B, S, D), validity, proxy positions and the layer's kwargs.
        probe_modules: the prune layer, final norm and prediction head.
        candidates: (B, S) bool, the visual tokens that may be kept or dropped.
        budgets: (B,) long, how many candidates each row keeps (<= its candidate count).
        config: the wrap's settings (where and how much to prune; the default selector's settings).
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
    mask and (B, S, D) replacement hidden states for the stage's input (merging selectors).

    A selector may set ``first_layer = 0`` when it reads no hidden states (it may then prune
    before decoder layer 0); without it a stage starts at layer 1 or later.
    """

    def __call__(self, request: SelectionRequest) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


class PioSelector:
    """PIO-FVLM: gradient saliency of the layer-local proxy loss, then NMS to the budget.

    Args:
        nms_threshold: cosine-similarity threshold of the greedy NMS (0.8, the authors'); None:
            plain top-k by saliency.
        proxy_tokens: K, the prompt positions whose predictions form the proxy loss (4).
        proxy_includes_last: False (the authors' code): the K positions before the last real
            token; True: the last K, the last one included.
        probe: how the saliency is computed. ``"auto"``: the cheapest exact probe the layer allows
            (closed form, else autograd at the proxy positions, else autograd through the layer);
            ``"captured"``: the closed form as one compiled graph per shape bucket (see
            ``wrap(capture=True)``); ``"closed_form"``, ``"fast"``, ``"full"``: that probe, refused
            at ``wrap`` where the layer does not allow it. All give the same saliency.

    ``wrap(model, nms_threshold=0.7, ...)`` builds this selector from its keywords.
    """

    def __init__(self, nms_threshold: float | None = 0.8, proxy_tokens: int = 4, proxy_includes_last: bool = False,
                 probe: ProbeChoice = "auto") -> None:
        nms_threshold, proxy_tokens = plain_number(nms_threshold), plain_number(proxy_tokens)
        check_nms_threshold(nms_threshold)
        check_proxy_tokens(proxy_tokens)
        check_flag("proxy_includes_last", proxy_includes_last)
        if probe not in PROBE_CHOICES:
            raise ValueError(f"probe must be one of {PROBE_CHOICES}; got {probe!r}")
        self.nms_threshold: float | None = nms_threshold
        self.proxy = ProxyWindow(proxy_tokens, proxy_includes_last)
        self.probe: ProbeChoice = probe

    def __repr__(self) -> str:
        return (f"PioSelector(nms_threshold={self.nms_threshold}, proxy_tokens={self.proxy.tokens}, "
                f"proxy_includes_last={self.proxy.includes_last}, probe={self.probe!r})")

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
            self.nms_threshold,
            request.candidate_counts,
            request.budget_counts,
        )
