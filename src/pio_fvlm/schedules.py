"""Multi-stage schedules: where to prune and how many visual tokens survive each stage.

A schedule is a list of ``(layer, kept)`` pairs with strictly increasing layers and
non-increasing counts: from ``layer`` on, ``kept`` visual tokens remain. Papers label such a
schedule by the *per-layer average* number of visual tokens over all decoder layers (layer 0..
p1-1 counting every visual token); :func:`average_budget` computes it and :func:`schedule_for`
inverts it. Everything else in pio_fvlm says "64 tokens" for 64 visual tokens *kept*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import Budget, plain_number, validate_budget

Schedule = tuple[tuple[int, Budget], ...]

# The authors' 3-stage schedules for 32-layer LLaVA-1.5 (576 visual tokens), by per-layer average.
_PAPER_SHAPE = (218 / 128, 1.0, 54 / 128)  # relative counts of their "128" schedule
PRESETS: dict[str, Schedule] = {
    "paper-128": ((1, 218), (10, 128), (15, 54)),
    "paper-64": ((1, 92), (10, 54), (15, 22)),
    # The same 3-stage shape as fractions of each sample's visual tokens: 11.1 % per-layer average
    # for any count (LLaVA-NeXT's up to 2,880 tokens, Qwen's dynamic resolution). The authors'
    # exact LLaVA-NeXT schedule is not public; this is paper-64 scaled, not a copy of it.
    "paper-11%": ((1, 92 / 576), (10, 54 / 576), (15, 22 / 576)),
}


def normalize_schedule(schedule: object, num_layers: int, first_layer: int = 1) -> Schedule:
    """Check a schedule against a model with ``num_layers`` decoder layers; return it as tuples.
    ``first_layer``: the earliest layer a stage may start at (see :meth:`PruneConfig.validate`)."""
    hint = "pass e.g. schedule=[(1, 218), (10, 128), (15, 54)]: (layer, visual tokens kept from there on)"
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or len(schedule) == 0:
        raise TypeError(f"schedule must be a non-empty list of (layer, kept) pairs; {hint}; got {schedule!r}")
    stages = []
    for item in schedule:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(f"each schedule entry must be a (layer, kept) pair; {hint}; got {item!r}")
        layer, kept = (plain_number(v) for v in item)
        if isinstance(layer, bool) or not isinstance(layer, int) or not first_layer <= layer <= num_layers - 1:
            raise ValueError(
                f"schedule layer {layer!r} is out of range: each layer must be an int in "
                f"{first_layer}..{num_layers - 1} for this {num_layers}-layer language model"
            )
        validate_budget(kept)
        stages.append((layer, kept))
    layers = [s[0] for s in stages]
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"schedule layers must be strictly increasing; got {layers}")
    kinds = {isinstance(s[1], float) for s in stages}
    if len(kinds) > 1:
        raise ValueError("schedule counts must be all ints (tokens) or all floats (fractions), not mixed")
    counts = [s[1] for s in stages]
    if any(b > a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"schedule counts must not increase from stage to stage; got {counts}")
    return tuple(stages)


def average_budget(schedule: Sequence[tuple[int, Budget]], num_layers: int, n_visual: int) -> float:
    """Per-layer average of visual tokens over all ``num_layers`` decoder layers.

    >>> average_budget([(1, 218), (10, 128), (15, 54)], 32, 576)
    128.0
    """
    stages = normalize_schedule(schedule, num_layers)
    total = stages[0][0] * n_visual
    for i, (layer, kept) in enumerate(stages):
        end = stages[i + 1][0] if i + 1 < len(stages) else num_layers
        count = kept if isinstance(kept, int) else max(1, math.floor(kept * n_visual + 0.5))
        total += (end - layer) * min(count, n_visual)
    return total / num_layers


def schedule_for(
    average: float,
    layers: Sequence[int] = (1, 10, 15),
    *,
    num_layers: int = 32,
    n_visual: int = 576,
) -> Schedule:
    """A schedule at ``layers`` whose per-layer average is ``average`` (to rounding).

    The counts follow the shape of the authors' schedules (stage i keeps ``a * w_i`` tokens,
    ``w = (1.70, 1.0, 0.42)`` for three stages, linearly resampled for other stage counts);
    ``a`` is solved for. ``schedule_for(64)`` gives ``((1, 91), (10, 54), (15, 23))`` next to the
    authors' ``((1, 92), (10, 54), (15, 22))``.
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one prune layer")
    n = len(layers)
    shape = [_PAPER_SHAPE[round(i * 2 / (n - 1))] if n > 1 else 1.0 for i in range(n)]
    spans = [(layers[i + 1] if i + 1 < n else num_layers) - layers[i] for i in range(n)]
    head = layers[0] * n_visual
    weight = sum(w * s for w, s in zip(shape, spans))
    scale = (average * num_layers - head) / weight
    if scale <= 0:
        raise ValueError(
            f"an average of {average} tokens per layer is below what layers 0..{layers[0] - 1} already "
            f"spend on all {n_visual} visual tokens; prune earlier or ask for a larger average"
        )
    counts = [max(1, min(n_visual, round(scale * w))) for w in shape]
    for i in range(1, n):
        counts[i] = min(counts[i], counts[i - 1])
    return normalize_schedule(list(zip(layers, counts)), num_layers)


PRESET_DEPTH = 32  # the presets are the authors' schedules for 32-layer LLaVA-1.5


def preset(name: str, num_layers: int = PRESET_DEPTH) -> Schedule:
    """A named schedule (see :data:`PRESETS`; ``"paper-192"`` is derived with :func:`schedule_for`)
    for a language model of ``num_layers`` decoder layers.

    The presets are written for 32 layers and named by their per-layer average (on 576 visual
    tokens). For another depth every stage's layer scales with it (``round(layer * num_layers /
    32)``, kept strictly increasing) and all counts by one common factor chosen so that the
    per-layer average stays the preset's: ``paper-64`` on a 28-layer model is
    ``((1, 87), (9, 51), (13, 21))``, still 64 on average.
    """
    if name == "paper-192":
        schedule = schedule_for(192)
    elif name in PRESETS:
        schedule = PRESETS[name]
    else:
        raise ValueError(f"unknown preset {name!r}; use one of {sorted([*PRESETS, 'paper-192'])}")
    if num_layers == PRESET_DEPTH:
        return schedule
    layers: list[int] = []
    for layer, _ in schedule:
        scaled = max(1, round(layer * num_layers / PRESET_DEPTH))
        layers.append(max(scaled, layers[-1] + 1) if layers else scaled)
    if layers[-1] > num_layers - 1:
        raise ValueError(
            f"preset {name!r} needs at least {len(schedule) + 1} decoder layers to place its {len(schedule)} "
            f"stages; this language model has {num_layers}: pass budget= and layer= instead"
        )
    n_visual = 576
    target = average_budget(schedule, PRESET_DEPTH, n_visual)
    counts = [kept * n_visual if isinstance(kept, float) else kept for _, kept in schedule]
    spans = [(layers[i + 1] if i + 1 < len(layers) else num_layers) - layers[i] for i in range(len(layers))]
    factor = (target * num_layers - layers[0] * n_visual) / sum(s * c for s, c in zip(spans, counts))
    if factor <= 0:
        raise ValueError(f"preset {name!r} cannot keep its average on a {num_layers}-layer model (the layers "
                         f"before its first stage already exceed it): pass budget= and layer= instead")
    fractions = isinstance(schedule[0][1], float)
    scaled_counts: list[Budget] = [
        min(1.0, factor * c / n_visual) if fractions else max(1, min(n_visual, round(factor * c))) for c in counts
    ]
    return normalize_schedule(list(zip(layers, scaled_counts)), num_layers)
