"""What ``wrap`` decides before it touches the model: the settings, checked, and the plan of stages.

:func:`settings_from` turns wrap's keywords (or a ``PruneConfig``) into one config;
:func:`plan_pruning` reads the model (its parts, depth, family, attention backend) and returns a
:class:`PruningPlan`. Neither installs anything: :class:`~pio_fvlm.runtime.Runtime` is built from
the plan in one step, and its ``install`` is the only code that puts hooks on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import PruneConfig, StageBudget, validate_budget
from .encoder import check_encoder_settings, install_encoder
from .models import adapter_for
from .models.base import ModelParts
from .runtime.masks import check_attention_backend
from .schedules import normalize_schedule
from .schedules import preset as named_schedule
from .select import PioSelector, Selector

# Settings of the method that a PioSelector carries itself (wrap refuses them beside one).
METHOD_SETTINGS = ("nms_threshold", "proxy_tokens", "proxy_includes_last", "capture")
MethodPatch = tuple[nn.Module, str, Any]  # (module, method name, instance-level stand-in)


@dataclass(frozen=True)
class Stage:
    """From decoder layer ``layer`` on, ``budget`` visual tokens remain, chosen by ``selector``
    (an encoder mode's stage sits at layer 0 with a budget rule of its own)."""

    layer: int
    budget: StageBudget
    selector: Selector


@dataclass(frozen=True)
class PruningPlan:
    """Everything a wrapped model's runtime is built from.

    Attributes:
        parts: where the model's layers, norm and head are (the family's adapter found them).
        config: the checked settings (``pio_fvlm.get_config`` reports them).
        stages: the prune stages by increasing layer, the encoder stage first when there is one.
        extra_hooks: forward pre-hooks ``(module, hook)`` on other parts (an encoder mode's captures).
        method_patches: instance-level stand-ins for methods that must follow the pruning.
        family_patches: ``runtime -> stand-ins`` of the family (e.g. Qwen3-VL's DeepStack), which need
            the runtime to ask which positions were kept; ``None`` for most families.
    """

    parts: ModelParts
    config: PruneConfig
    stages: tuple[Stage, ...]
    extra_hooks: tuple[tuple[nn.Module, Any], ...] = ()
    method_patches: tuple[MethodPatch, ...] = ()
    family_patches: Callable[[Any], list[MethodPatch]] | None = None


def settings_from(keywords: Mapping[str, Any], preset: str | None, config: PruneConfig | None
                  ) -> tuple[PruneConfig, frozenset[str]]:
    """The one config of a wrap's keywords (those given), ``preset=`` or ``config=``, and the names
    given as keywords. Refuses a setting given two ways, with what to pass instead."""
    given = dict(keywords)
    if "budget" in given and given["budget"] is None:
        validate_budget(None)  # None as a keyword is no default here: the message says what to pass
    if "layer" in given and given["layer"] is None:
        raise TypeError("layer must be an int, the decoder layer from which on tokens are pruned (1 is the "
                        "authors' setting); got None")
    if preset is not None:
        if "schedule" in given:
            raise ValueError("pass either preset= or schedule=, not both")
        given["schedule"] = named_schedule(preset)
    if config is None:
        return PruneConfig(**given), frozenset(given)
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a pio_fvlm.PruneConfig; got {type(config).__name__}")
    if given:
        raise ValueError(
            f"pass the settings either as keywords or as config=PruneConfig(...), not both "
            f"(got config and {sorted(given)}); use config.replace({', '.join(given)}=...) instead"
        )
    return config, frozenset()


def plan_pruning(model: nn.Module, config: PruneConfig, selector: Selector | None = None, *,
                 preset: str | None = None, given: frozenset[str] = frozenset()) -> PruningPlan:
    """Check ``config`` against ``model`` and plan its pruning; the model is not changed.

    ``selector``: the token choice of every stage (default: a :class:`PioSelector` with the config's
    method settings). ``preset``: the named schedule, scaled to this model's depth. ``given``: the
    settings passed as keywords (refused beside a ``PioSelector``, which carries its own).
    """
    adapter = adapter_for(model)
    parts = adapter.find_parts(model)
    depth = len(parts.layers)
    selector, config = _method_selector(selector, config, given)
    first_layer = int(getattr(selector, "first_layer", 1))
    if preset is not None:
        config = config.replace(schedule=named_schedule(preset, depth))
    if config.schedule is not None:
        config = config.replace(schedule=normalize_schedule(config.schedule, depth, first_layer))
    config.validate(depth, first_layer)
    if config.encoder is not None or config.encoder_budget is not None:
        check_encoder_settings(config.encoder, config.encoder_budget)
    if config.positions not in adapter.position_modes:
        raise ValueError(
            f"positions={config.positions!r} is not available for {adapter.name}: use one of "
            f"{adapter.position_modes} (M-RoPE models keep each kept token's 3-D position)"
        )
    check_attention_backend(parts.text_config)
    stages = [Stage(layer, budget, selector) for layer, budget in config.stages()]
    hooks: tuple[tuple[nn.Module, Any], ...] = ()
    patches: tuple[MethodPatch, ...] = ()
    if config.encoder is not None:
        assert config.encoder_budget is not None
        encoder = install_encoder(model, config.encoder_budget)
        if stages[0].layer == 0:
            raise ValueError("encoder= already reduces the visual tokens before layer 0: start the schedule "
                             "(or layer=) at layer 1 or later")
        stages.insert(0, Stage(0, encoder.budget, encoder.selector))
        hooks, patches = tuple(encoder.hooks), tuple(encoder.method_patches)
    family = adapter.method_patches
    return PruningPlan(parts, config, tuple(stages), hooks, patches,
                       None if family is None else (lambda runtime: family(model, runtime)))


def _method_selector(selector: Selector | None, config: PruneConfig, given: frozenset[str]
                     ) -> tuple[Selector, PruneConfig]:
    """The selector of every stage, and the config that reports its settings: a ``PioSelector``
    built from the method's keywords, or the one passed in (whose settings the config then takes)."""
    if selector is None:
        return PioSelector(config.nms_threshold, config.proxy_tokens, config.proxy_includes_last,
                           "captured" if config.capture else "auto"), config
    if not isinstance(selector, PioSelector):
        return selector, config  # a baseline or a user's own: the config's settings are what it may read
    clash = sorted(set(METHOD_SETTINGS) & given)
    if clash:
        raise ValueError(f"the PioSelector passed as selector= has its own {', '.join(clash)}: set "
                         f"{'them' if len(clash) > 1 else 'it'} there (PioSelector({clash[0]}=...)), not on wrap")
    return selector, config.replace(nms_threshold=selector.nms_threshold, proxy_tokens=selector.proxy.tokens,
                                    proxy_includes_last=selector.proxy.includes_last,
                                    capture=selector.probe == "captured")
