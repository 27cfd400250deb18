"""The public entry points: wrap, unwrap, last_selection."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from .compat import warn_if_untested_versions
from .config import Budget, PruneConfig
from .encoder import check_encoder_settings, install_encoder
from .models import adapter_for
from .runtime import Runtime, RuntimeInfo
from .runtime.masks import check_attention_backend
from .schedules import normalize_schedule
from .select import PioSelector, Selector

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
    too is an error, and :func:`get_config` reports the selector's.
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
    given = {k: v for k, v in keywords.items() if v is not _UNSET}
    if preset is not None:
        from .schedules import preset as named_schedule

        if "schedule" in given:
            raise ValueError("pass either preset= or schedule=, not both")
        given["schedule"] = named_schedule(preset)
    if given.get("schedule") is not None and ({"budget", "layer"} & set(given)):
        raise ValueError(
            "schedule= (or preset=) replaces budget= and layer=: pass either a schedule or a budget and a layer"
        )
    if config is not None:
        if not isinstance(config, PruneConfig):
            raise TypeError(f"config must be a pio_fvlm.PruneConfig; got {type(config).__name__}")
        if given:
            raise ValueError(
                f"pass the settings either as keywords or as config=PruneConfig(...), not both "
                f"(got config and {sorted(given)}); use config.replace({', '.join(given)}=...) instead"
            )
    else:
        config = PruneConfig(**given)  # type: ignore[arg-type]
    adapter = adapter_for(model)
    parts = adapter.find_parts(model)
    if preset is not None:  # scaled to this model's depth
        from .schedules import preset as named_schedule

        config = config.replace(schedule=named_schedule(preset, len(parts.layers)))
    if config.schedule is not None:
        config = config.replace(schedule=normalize_schedule(config.schedule, len(parts.layers)))
    config.validate(len(parts.layers))
    if config.encoder is not None or config.encoder_budget is not None:
        check_encoder_settings(config.encoder, config.encoder_budget)
    if config.positions not in adapter.position_modes:
        raise ValueError(
            f"positions={config.positions!r} is not available for {adapter.name}: use one of "
            f"{adapter.position_modes} (M-RoPE models keep each kept token's 3-D position)"
        )
    check_attention_backend(parts.text_config)
    selector, config = _method_selector(selector, config, set(given))
    stages: list[tuple[int, Any]] = list(config.stages())
    selectors: list[Selector] = [selector] * len(stages)
    extra_hooks: list[tuple[nn.Module, Any]] = []
    method_patches: list[tuple[nn.Module, str, Any]] = []
    if config.encoder is not None:
        assert config.encoder_budget is not None
        installed = install_encoder(model, config.encoder_budget)
        stages.insert(0, (0, installed.budget))
        selectors.insert(0, installed.selector)
        extra_hooks.extend(installed.hooks)
        method_patches.extend(installed.method_patches)
    if is_wrapped(model):
        unwrap(model)
    attach(model, runtime_for(model, parts, config, stages, selectors, extra_hooks, method_patches))
    return model


_METHOD_SETTINGS = ("nms_threshold", "proxy_tokens", "proxy_includes_last", "capture")


def _method_selector(selector: Selector | None, config: PruneConfig, given: set[str]
                     ) -> tuple[Selector, PruneConfig]:
    """The selector of every stage, and the config that reports its settings: a ``PioSelector``
    built from the method's keywords, or the one passed in (whose settings the config then takes)."""
    if selector is None:
        return PioSelector(config.nms_threshold, config.proxy_tokens, config.proxy_includes_last,
                           "captured" if config.capture else "auto"), config
    if not isinstance(selector, PioSelector):
        return selector, config  # a baseline or a user's own: the config's settings are what it may read
    clash = sorted(set(_METHOD_SETTINGS) & given)
    if clash:
        raise ValueError(f"the PioSelector passed as selector= has its own {', '.join(clash)}: set "
                         f"{'them' if len(clash) > 1 else 'it'} there (PioSelector({clash[0]}=...)), not on wrap")
    return selector, config.replace(nms_threshold=selector.nms_threshold, proxy_tokens=selector.proxy.tokens,
                                    proxy_includes_last=selector.proxy.includes_last,
                                    capture=selector.probe == "captured")


def runtime_for(model: nn.Module, parts: Any, config: PruneConfig, stages: list[tuple[int, Any]],
                selectors: list[Selector], extra_hooks: Sequence[tuple[nn.Module, Any]] = (),
                method_patches: Sequence[tuple[nn.Module, str, Any]] = ()) -> Runtime:
    """The runtime of ``model``'s pruning, built in one step: the given hooks and stand-ins plus the
    model family's own (methods of the model that must follow the pruning, e.g. Qwen3-VL's DeepStack)."""
    family = adapter_for(model).method_patches
    return Runtime(parts, config, stages, selectors, extra_hooks=extra_hooks, method_patches=method_patches,
                   family_patches=None if family is None else (lambda runtime: family(model, runtime)))


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
