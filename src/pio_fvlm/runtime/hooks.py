"""The runtime: forward hooks that prune in prefill and keep cached decoding consistent.

Data flow of one call, one file per step (``Runtime`` is the chain of their classes, and this
module installs and removes its hooks):

1. ``call_start``: a pre-hook on the VLM's base module records where this call's visual tokens are.
2. Layers before the first prune point run untouched.
3. ``first_stage``: the pre-hook of a stage's first layer, in a prefill with visual tokens, runs
   the selector on the hidden states it receives and builds the stage's inputs: gathered hidden
   states, position ids / embeddings, and a fresh attention mask of the shortened sequence.
   Every layer of the stage gets them (``Runtime._layer_start``). Their KV cache therefore holds
   only kept tokens; a record kept per cache object says which full positions those are.
4. ``later_stages``: each later stage of a schedule selects among the survivors of the one before.
5. ``call_end``: a forward hook on the last layer scatters the hidden states back to full length.
6. ``continuation``: later calls with that cache (decode steps) give the stage's layers a mask
   built from the record, so that keys line up with the short cache.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..config import PruneConfig, StageBudget
from ..models.base import ModelParts
from ..select.closed_form import supports_closed_form
from ..select.saliency import PROBING, supports_fast_probe
from ..select.selector import ProbeKind, ProxyWindow, Selector
from .call_end import CallEnd
from .first_stage import hidden_of
from .plan import gather_tokens
from .state import CacheRecord, CallState, StageInputs

logger = logging.getLogger("pio_fvlm")


def _flash_backend(text_config: Any) -> bool:
    return str(getattr(text_config, "_attn_implementation", None) or "").startswith("flash_attention")


def _offloaded(module: torch.nn.Module) -> bool:
    """True when accelerate offloads the module's weights (they sit on the meta device)."""
    return any(p.device.type == "meta" for p in module.parameters())


@dataclass(frozen=True)
class RuntimeInfo:
    """A wrapped model's pruning, read from outside (:func:`pio_fvlm.describe`).

    Attributes:
        stages: ``((layer, budget), ...)``: from which decoder layer on each stage keeps how many
            visual tokens (an encoder mode's stage at layer 0 has a rule of its own).
        selectors: the selector of each stage.
        probes: each stage's probe: ``"closed_form"``, ``"captured"``, ``"fast"`` or ``"full"``.
        cache_records: KV caches whose pruned layout is remembered (they die with their cache).
        open_calls: forward calls started and not yet ended (0 between calls).
    """

    stages: tuple[tuple[int, StageBudget], ...]
    selectors: tuple[Selector, ...]
    probes: tuple[str, ...]
    cache_records: int
    open_calls: int


class Runtime(CallEnd):
    """Hooks and per-cache records for one wrapped model.

    Args:
        parts: where the model's pieces are (from the adapter).
        config: validated settings.
        stages: ``[(prune layer, budget), ...]`` with increasing layers.
        selector: chooses the kept visual tokens at each stage (one, or one per stage).
        extra_hooks: forward pre-hooks of other parts of the model, ``(module, hook)`` (an encoder
            mode's captures of the vision tower).
        method_patches: instance-level stand-ins ``(module, method name, stand-in)`` for methods
            that must follow the pruning.
        family_patches: ``runtime -> method patches`` for stand-ins that need this runtime (the
            adapter's, e.g. Qwen3-VL's DeepStack, which asks which positions were kept).
    Everything it installs is given here; :meth:`install` and :meth:`remove` are the only code
    that puts it on the model and takes it off.
    """

    def __init__(
        self,
        parts: ModelParts,
        config: PruneConfig,
        stages: list[tuple[int, StageBudget]],
        selector: Selector | list[Selector],
        *,
        extra_hooks: Sequence[tuple[torch.nn.Module, Any]] = (),
        method_patches: Sequence[tuple[torch.nn.Module, str, Any]] = (),
        family_patches: Callable[[Runtime], list[tuple[torch.nn.Module, str, Any]]] | None = None,
    ) -> None:
        self.parts = parts
        self.config = config
        self.stages = stages
        self.selectors = selector if isinstance(selector, list) else [selector] * len(stages)
        n_layers = len(parts.layers)
        self.stage_of: dict[int, int] = {}
        for s, (start, _) in enumerate(stages):
            end = stages[s + 1][0] if s + 1 < len(stages) else n_layers
            self.stage_of.update({i: s for i in range(start, end)})
        # The closed-form and fast probes call the layer's sub-modules and read weights directly;
        # a layer whose weights accelerate keeps off the device (CPU / disk offload: meta
        # parameters until its own forward runs) gets the generic probe, which calls the layer.
        # Each stage's selector names its probe and proxy window; a selector that names none (a
        # baseline, a user's own) gets the wrap's settings.
        default_probe = "captured" if config.capture else "auto"
        self.probes = [self._probe_kind(parts.layers[start], getattr(selector, "probe", None) or default_probe)
                       for (start, _), selector in zip(stages, self.selectors)]
        default_window = ProxyWindow(config.proxy_tokens, config.proxy_includes_last)
        self.windows: list[ProxyWindow] = [getattr(selector, "proxy", None) or default_window
                                           for selector in self.selectors]
        self._handles: list[RemovableHandle] = []
        self._extra_hooks = list(extra_hooks)
        self._method_patches = list(method_patches)
        self._fresh_state()
        if family_patches is not None:
            self._method_patches += family_patches(self)

    def _fresh_state(self) -> None:
        """Per-process state: never copied by deepcopy or pickle (locks and context variables
        cannot be, and records belong to live cache objects)."""
        self._records: weakref.WeakKeyDictionary[Any, CacheRecord] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._call: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
            f"pio_fvlm_call_{id(self)}", default=None
        )
        self._tokens: dict[int, contextvars.Token[CallState | None]] = {}
        # the most recent visual prefill: its (B, L) visual mask and each stage's full_index
        self._last: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None
        self._warned: set[str] = set()
        self._id_tensors: dict[str, torch.Tensor] = {}
        self._true: dict[str, torch.Tensor] = {}

    def _probe_kind(self, layer: torch.nn.Module, choice: str) -> ProbeKind:
        """The probe of a stage whose selector asks for ``choice`` (see :class:`PioSelector`)."""
        head, norm = self.parts.head, self.parts.norm
        closed = not any(map(_offloaded, (layer, head, norm))) and supports_closed_form(layer, norm, head)
        fast = not _offloaded(layer) and supports_fast_probe(layer)
        if choice in ("closed_form", "fast", "full"):
            if (choice == "closed_form" and not closed) or (choice == "fast" and not fast):
                raise ValueError(f"probe={choice!r} is not available for this model's layers (or offloaded "
                                 f"weights): use probe='auto', which picks the cheapest exact probe they allow")
            return choice  # type: ignore[return-value]
        if _offloaded(layer):
            return "full"
        if closed:
            return "captured" if choice == "captured" else "closed_form"
        if choice == "captured":
            logger.warning("pio_fvlm: capture=True needs the closed-form probe, which this model's layers (or "
                           "offloaded weights) do not allow; the probe runs uncaptured.")
        return "fast" if fast else "full"

    _PORTABLE = ("parts", "config", "stages", "selectors", "stage_of", "probes", "windows", "_handles",
                 "_extra_hooks", "_method_patches")

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in self._PORTABLE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh_state()

    def __deepcopy__(self, memo: dict[int, Any]) -> Runtime:
        # Register first: the copied modules' hook dicts hold bound methods of this runtime,
        # and deep-copying those must land on the new runtime, not a second one.
        new = Runtime.__new__(Runtime)
        memo[id(self)] = new
        new.__setstate__({k: copy.deepcopy(self.__dict__[k], memo) for k in self._PORTABLE})
        return new

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        base, layers = self.parts.base, self.parts.layers
        # A deepcopy or pickle of the model carries these handles along with the modules' hook
        # dictionaries (one memo), so the copy's handles point at the copy's dictionaries.
        self._handles = [
            base.register_forward_pre_hook(self._call_start, with_kwargs=True),
            base.register_forward_hook(self._call_end, with_kwargs=True, always_call=True),
        ]
        for i in sorted(self.stage_of):
            hook = partial(self._layer_start, i)
            self._handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
        self._handles.append(layers[-1].register_forward_hook(self._last_layer_end, with_kwargs=True))
        for module, hook in self._extra_hooks:
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module, name, stand_in in self._method_patches:
            module.__dict__[name] = stand_in  # shadows the class's method for this instance only

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, name, stand_in in self._method_patches:
            if module.__dict__.get(name) is stand_in:
                del module.__dict__[name]

    # ------------------------------------------------------------------ public read-outs
    def describe(self) -> RuntimeInfo:
        """What this runtime prunes with and what it holds now (see :class:`RuntimeInfo`)."""
        return RuntimeInfo(stages=tuple(self.stages), selectors=tuple(self.selectors), probes=tuple(self.probes),
                           cache_records=len(self._records),
                           open_calls=len(self._tokens))  # each open call holds its context token

    def last_selection(self, stage: int = -1) -> list[torch.Tensor] | None:
        """Per sample, sorted positions (in that call's input_ids) of the visual tokens kept
        from stage ``stage`` on (default: the last stage)."""
        if self._last is None:
            return None
        if not -len(self.stages) <= stage < len(self.stages):
            raise ValueError(f"stage={stage} is out of range: this wrap has {len(self.stages)} stage(s)")
        visual, full_indices = self._last
        full_index = full_indices[stage]
        if full_index is None:  # nothing pruned: every visual token was kept
            return [row.nonzero().flatten().cpu() for row in visual]
        kept = (full_index >= 0) & visual.gather(1, full_index.clamp(min=0))
        return [fi[k].sort().values.cpu() for fi, k in zip(full_index, kept)]

    def stage_of_layer_that_ran(self) -> StageInputs | None:
        """What the hooked decoder layer that ran last in the current call received (its stage's
        inputs), or None outside a call, before the first hooked layer, or for a stage left as is."""
        call = self._call.get()
        if call is None or call.layer is None:
            return None
        return call.stages.get(self.stage_of[call.layer])






    # ------------------------------------------------------------------ layers
    def _layer_start(
        self, i: int, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if PROBING.get():
            return None
        call = self._call.get()
        if call is None:
            return None
        call.layer = i
        s = self.stage_of[i]
        if s not in call.stages:
            call.stages[s] = self._prepare_stage(call, s, i, args, kwargs)
        st = call.stages[s]
        if st is None:
            return None
        hidden = hidden_of(args, kwargs)
        if i == st.start_layer and st.gather_index is not None:
            hidden = gather_tokens(st.replacement if st.replacement is not None else hidden, st.gather_index)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = st.attention_mask
        if st.position_ids is not None and "position_ids" in kwargs:
            kwargs["position_ids"] = st.position_ids
        if st.position_embeddings is not None and "position_embeddings" in kwargs:
            kwargs["position_embeddings"] = st.position_embeddings
            if _flash_backend(self.parts.text_config):
                # The rotary comes from position_embeddings. transformers' FlashAttention reads
                # position ids only to detect packed sequences: kept positions have gaps, which it
                # would take for packing at batch 1 (exact, but a host read in every pruned layer).
                kwargs["position_ids"] = None
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs











