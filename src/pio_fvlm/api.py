"""The public entry points: wrap, unwrap, pruned, describe, get_config, last_selection."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from .compat import warn_if_untested_versions
from .config import Budget, PruneConfig
from .planning import PruningPlan, plan_pruning, settings_from
from .runtime import Runtime, RuntimeInfo
from .select import Selector

_RUNTIME_ATTR = "_pio_fvlm_runtime"
M = TypeVar("M", bound=nn.Module)


class _Unset:
    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


def wrap(
    model: M,
    budget: Budget = _UNSET,
    *,
    layer: int = _UNSET,
    nms_threshold: float | None = _UNSET,
    proxy_tokens: int = _UNSET,
    proxy_includes_last: bool = _UNSET,
    positions: Literal["keep", "compact"] = _UNSET,
    schedule: Sequence[tuple[int, Budget]] | None = _UNSET,
    preset: str | None = None,
    encoder: str | None = _UNSET,
    encoder_budget: int | None = _UNSET,
    capture: bool = _UNSET,
    config: PruneConfig | None = None,
    selector: Selector | None = None,
) -> M:
    """Make ``model`` prune visual tokens with PIO-FVLM, in place; returns the same object.

    Defaults are the authors': ``budget=64, layer=1, nms_threshold=0.8, proxy_tokens=4,
    proxy_includes_last=False, positions="keep"`` (see :class:`PruneConfig` for each).
    ``config=`` passes the same settings as one object; giving both ``config`` and a keyword
    is an error. Wrapping an already wrapped model replaces its settings (no stacking).
    ``schedule=[(layer, kept), ...]`` prunes in several stages (instead of ``budget``/``layer``);
    ``preset="paper-64"`` (or ``"paper-128"``, ``"paper-192"``) uses the authors' LLaVA-1.5 schedules
    (written for 32 layers; on another depth their layers scale with it, see :func:`pio_fvlm.schedules.preset`).
    ``encoder="visionzip", encoder_budget=128`` first reduces the visual tokens before the language
    model (encoder-involved mode; LLaVA-1.5: 128 per image, VisionZip-style; Qwen2-VL / Qwen2.5-VL:
    128 per sample, window-local + global on the tower's attention; see :mod:`pio_fvlm.encoder`).
    ``capture=True`` runs the probe as one compiled graph per shape bucket (a CUDA graph on a GPU:
    for batch 1 on a fast GPU; the first prefill of each bucket compiles).
    ``selector=`` swaps the token choice (for baselines and tests); by default it is
    ``PioSelector(nms_threshold, proxy_tokens, proxy_includes_last, probe)`` built from those
    keywords. A ``PioSelector`` passed in carries its own method settings: giving those keywords
    too is an error, and :func:`get_config` reports the selector's. ``layer=0`` is allowed for a
    selector that reads no hidden states (``UniformSelector``, ``RandomSelector``).
    The settings are checked and planned by :func:`pio_fvlm.planning.plan_pruning` (which changes
    nothing), then the runtime built from the plan is installed.
    """
    warn_if_untested_versions()
    keywords = {
        "budget": budget,
        "layer": layer,
        "nms_threshold": nms_threshold,
        "proxy_tokens": proxy_tokens,
        "proxy_includes_last": proxy_includes_last,
        "positions": positions,
        "schedule": schedule,
        "encoder": encoder,
        "encoder_budget": encoder_budget,
        "capture": capture,
    }
    settings, given = settings_from({k: v for k, v in keywords.items() if v is not _UNSET}, preset, config)
    plan = plan_pruning(model, settings, selector, preset=preset, given=given)
    if is_wrapped(model):
        unwrap(model)
    attach(model, runtime_for(plan))
    return model


def runtime_for(plan: PruningPlan) -> Runtime:
    """The runtime of a plan (:func:`pio_fvlm.planning.plan_pruning`), built in one step."""
    return Runtime(plan.parts, plan.config, [(s.layer, s.budget) for s in plan.stages],
                   [s.selector for s in plan.stages], extra_hooks=plan.extra_hooks,
                   method_patches=plan.method_patches, family_patches=plan.family_patches)


def attach(model: nn.Module, runtime: Runtime) -> None:
    """Install ``runtime`` on ``model``; ``unwrap`` removes it all."""
    runtime.install()
    object.__setattr__(model, _RUNTIME_ATTR, runtime)


@contextmanager
def pruned(model: M, budget: Budget = _UNSET, **settings: Any) -> Iterator[M]:
    """``wrap`` for the duration of a ``with`` block, then back to what the model was.

        with pio_fvlm.pruned(model, budget=64):
            out = model.generate(**inputs)

    Takes the same settings as :func:`wrap`. On exit the model is unwrapped, or, if it was
    wrapped before the block, wrapped again exactly as it was (same settings and selector).
    """
    previous = getattr(model, _RUNTIME_ATTR, None)
    if budget is not _UNSET:
        settings["budget"] = budget
    wrap(model, **settings)
    try:
        yield model
    finally:
        unwrap(model)
        if isinstance(previous, Runtime):
            previous.install()
            object.__setattr__(model, _RUNTIME_ATTR, previous)


def is_wrapped(model: nn.Module) -> bool:
    """True when ``wrap`` is in effect on ``model``."""
    return isinstance(getattr(model, _RUNTIME_ATTR, None), Runtime)


def _runtime(model: nn.Module) -> Runtime:
    runtime = getattr(model, _RUNTIME_ATTR, None)
    if not isinstance(runtime, Runtime):
        raise ValueError("this model is not wrapped: call pio_fvlm.wrap(model, budget=...) first")
    return runtime


def unwrap(model: M) -> M:
    """Remove every hook and record; the model behaves exactly as before ``wrap``."""
    _runtime(model).remove()
    object.__delattr__(model, _RUNTIME_ATTR)
    return model


def describe(model: nn.Module) -> RuntimeInfo:
    """A wrapped model's stages, selectors, probes and live state (:class:`~pio_fvlm.runtime.RuntimeInfo`)."""
    return _runtime(model).describe()


def get_config(model: nn.Module) -> PruneConfig:
    """The settings a wrapped model prunes with."""
    return _runtime(model).config


def last_selection(model: nn.Module, stage: int = -1) -> list[torch.Tensor] | None:
    """For the most recent prefill with visual tokens: per sample, a sorted 1-D LongTensor of
    the positions in that call's ``input_ids`` (padding included) of the visual tokens kept.

    ``stage`` picks a stage of a multi-stage schedule (default: the last, what the deepest
    layers see). ``None`` before any such call. A call without visual tokens (a text-only prompt,
    a decode step) leaves it unchanged. Across threads, the most recent call wins.
    """
    return _runtime(model).last_selection(stage)
