"""PruneConfig: every knob of the method in one validated object.

Validation happens once, at ``wrap`` time, and every error says what to pass instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

Budget = int | float  # what users pass: visual tokens kept (int) or the fraction kept (float)
# What a runtime stage keeps: a user's budget, or a rule of its own from the visual-token count
# (the encoder modes' per-sample counts)
StageBudget = int | float | Callable[[int], int]
POSITION_MODES = ("keep", "compact")
DEFAULT_BUDGET, DEFAULT_LAYER = 64, 1  # the authors' setting


@dataclass(frozen=True)
class PruneConfig:
    """Settings of PIO-FVLM pruning.

    Attributes:
        budget: visual tokens kept per sample (all images of one prompt together). An ``int``
            >= 1 is a count; a ``float`` in (0, 1] is a fraction of each sample's visual tokens
            (rounded half up, at least 1). A sample with fewer visual tokens than the budget
            keeps them all.
            ``64`` when neither it nor a schedule is given; ``None`` with a schedule.
        layer: the prune point p. Decoder layers ``0..p-1`` see the whole sequence, layers
            ``p..N-1`` only text plus the kept visual tokens. ``1`` is the authors' setting (and
            the default without a schedule); ``None`` with a schedule.
        nms_threshold: cosine-similarity threshold of the greedy NMS (``0.8`` as the
            authors). ``None`` turns NMS off (plain top-k by saliency).
        proxy_tokens: K, the number of prompt positions whose predictions form the proxy loss.
        proxy_includes_last: ``False`` reproduces the authors' code (the K positions before
            the last valid one); ``True`` uses the last K positions, the last one included.
        positions: ``"keep"``: kept tokens keep their original position ids; ``"compact"``:
            pruned layers renumber the shortened sequence contiguously (the authors' LLaVA code).
        schedule: multi-stage pruning instead of ``budget``/``layer`` (giving both is refused):
            ``((layer, kept), ...)`` with strictly increasing layers and non-increasing counts;
            each stage selects among the survivors of the previous one with its own probe at its
            layer.
        encoder: ``"visionzip"`` reduces the visual tokens to ``encoder_budget`` before the
            language model (encoder-involved mode: VisionZip-style on LLaVA-1.5, window-local +
            global on Qwen2-VL / Qwen2.5-VL), then the saliency stages prune on from there.
        encoder_budget: tokens kept by the encoder-side reduction: per image on LLaVA-1.5 (fixed
            576-token images), per sample on Qwen (images of different sizes share it).
        capture: run the probe as one compiled graph per shape bucket (``torch.compile`` with
            ``mode="reduce-overhead"``: a CUDA graph on a GPU). Worth it at batch 1 on a fast GPU,
            where the probe's many small kernels cost more launch time than compute; the first
            prefill of each bucket compiles (seconds). See :mod:`pio_fvlm.select.capture`.
    """

    budget: Budget | None = None
    layer: int | None = None
    nms_threshold: float | None = 0.8
    proxy_tokens: int = 4
    proxy_includes_last: bool = False
    positions: Literal["keep", "compact"] = "keep"
    schedule: tuple[tuple[int, Budget], ...] | None = None
    encoder: str | None = None
    encoder_budget: int | None = None
    capture: bool = False

    def __post_init__(self) -> None:
        # numpy and torch scalars (np.int64(64), a 0-d tensor) become the Python numbers they hold
        for name in ("budget", "layer", "nms_threshold", "proxy_tokens", "encoder_budget"):
            object.__setattr__(self, name, plain_number(getattr(self, name)))
        # the one place the schedule / single-stage rule is checked (wrap's keywords come here too)
        if self.schedule is not None:
            if self.budget is not None or self.layer is not None:
                raise ValueError("schedule= (or preset=) replaces budget= and layer=: pass either a schedule "
                                 "or a budget and a layer")
        else:
            object.__setattr__(self, "budget", DEFAULT_BUDGET if self.budget is None else self.budget)
            object.__setattr__(self, "layer", DEFAULT_LAYER if self.layer is None else self.layer)

    def stages(self) -> tuple[tuple[int, Budget], ...]:
        """The prune stages: the schedule, or the single stage ``((layer, budget),)``."""
        if self.schedule is not None:
            return self.schedule
        assert self.layer is not None and self.budget is not None  # filled in by __post_init__
        return ((self.layer, self.budget),)

    def replace(self, **changes: object) -> PruneConfig:
        """A copy with some fields changed (validated like the original). The stages given win: a
        new ``schedule`` drops the single stage's ``budget`` / ``layer``, and a new ``budget`` or
        ``layer`` (without a schedule) drops the schedule."""
        if changes.get("schedule") is not None:
            changes = {"budget": None, "layer": None, **changes}
        elif ({"budget", "layer"} & set(changes)) and "schedule" not in changes:
            changes = {"schedule": None, **changes}
        return replace(self, **changes)  # type: ignore[arg-type]

    def validate(self, num_layers: int, first_layer: int = 1) -> PruneConfig:
        """Check every field against a model with ``num_layers`` decoder layers.

        ``first_layer``: the earliest prune layer the selector allows (1: it scores the hidden
        states layer 0 made; 0 for a selector that reads none, e.g. ``UniformSelector``).
        Returns ``self`` so that it can be chained. Raises ``TypeError`` / ``ValueError``
        with a message that names the accepted values. The schedule's own entries are checked by
        :func:`pio_fvlm.schedules.normalize_schedule` and the encoder settings by
        :func:`pio_fvlm.encoder.check_encoder_settings` (``wrap`` calls both).
        """
        if self.schedule is None:
            validate_budget(self.budget)
            check_layer(self.layer, num_layers, first_layer)
        check_nms_threshold(self.nms_threshold)
        check_proxy_tokens(self.proxy_tokens)
        check_flag("proxy_includes_last", self.proxy_includes_last)
        check_flag("capture", self.capture)
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}; got {self.positions!r}")
        return self


def check_layer(layer: object, num_layers: int, first_layer: int = 1) -> None:
    """Raise a clear error unless ``layer`` is a decoder layer a stage may start at: an int in
    ``first_layer .. num_layers - 1``."""
    span = f"{first_layer} <= layer <= {num_layers - 1}"
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, the decoder layer from which on tokens are pruned ({span}); "
                        f"got {layer!r}")
    if not first_layer <= layer <= num_layers - 1:
        why = ("layer 0 must see every token so that there are hidden states to score; 1 is the authors' setting"
               if first_layer == 1 else "the last layer has nothing after it to prune")
        raise ValueError(f"layer={layer} is out of range for a language model with {num_layers} decoder layers: "
                         f"pass {span} ({why})")


def plain_number(value: Any) -> Any:
    """A numpy or torch scalar number as the Python ``int`` / ``float`` it holds; anything else as is
    (booleans stay booleans, so that they are refused as numbers)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, (bool, int, float)):
        value = value.item()  # a 0-d tensor or array
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def check_nms_threshold(t: object) -> None:
    """Raise a clear error unless ``t`` is a cosine similarity in (-1, 1] or None (no NMS)."""
    if t is None:
        return
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise TypeError(f"nms_threshold must be a float in (-1, 1] or None (no NMS); got {t!r}")
    if not -1.0 < float(t) <= 1.0:
        raise ValueError(
            f"nms_threshold={t} is not a cosine similarity: pass a value in (-1, 1] "
            f"(0.8 is the authors' setting) or None to disable NMS"
        )


def check_proxy_tokens(k: object) -> None:
    """Raise a clear error unless ``k`` (the proxy loss's prompt positions) is an int >= 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"proxy_tokens must be an int >= 1 (4 is the authors' setting); got {k!r}")


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")


def validate_budget(budget: object) -> None:
    """Raise a clear error unless ``budget`` is an int >= 1 or a float in (0, 1]."""
    hint = (
        "pass an int >= 1 (visual tokens kept per sample, e.g. budget=64) or a float in (0, 1] "
        "(the fraction of each sample's visual tokens, e.g. budget=0.111)"
    )
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number: {hint}; got {budget!r}")
    if isinstance(budget, float):
        if math.isnan(budget) or not 0.0 < budget <= 1.0:
            raise ValueError(f"budget={budget!r} is not a valid fraction: {hint}")
    elif budget < 1:
        raise ValueError(f"budget={budget!r} would keep no visual token: {hint}")


def tokens_to_keep(budget: StageBudget, n_visual: int) -> int:
    """How many of a sample's ``n_visual`` visual tokens the budget keeps (never more than exist)."""
    if callable(budget):  # a rule of its own (encoder mode: a count per image)
        want = budget(n_visual)
    elif isinstance(budget, float):
        want = max(1, math.floor(budget * n_visual + 0.5))
    else:
        want = budget
    return min(want, n_visual)
