"""The runtime: forward hooks that prune in prefill and keep cached decoding consistent.

Data flow of one call:

1. A pre-hook on the VLM's base module records where this call's visual tokens are.
2. Layers before the first prune point run untouched.
3. The pre-hook of a stage's first layer, in a prefill with visual tokens, runs the selector
   on the hidden states it receives and builds the stage's inputs: gathered hidden states,
   position ids / embeddings, and a fresh attention mask of the shortened sequence. Every
   layer of the stage gets them. Their KV cache therefore holds only kept tokens; a record
   kept per cache object says which full positions those are.
4. A forward hook on the last layer scatters the hidden states back to full length.
5. Later calls with that cache (decode steps) give the stage's layers a mask built from the
   record, so that keys line up with the short cache.
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

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from ..compat import dynamic_cache_class, layer_cache
from ..config import PruneConfig, StageBudget, tokens_to_keep
from ..models.base import ModelParts
from ..select.closed_form import supports_closed_form
from ..select.saliency import PROBING, ProbeInputs, ProbeModules, proxy_query_positions, supports_fast_probe
from ..select.selector import ProbeKind, ProxyWindow, SelectionRequest, Selector
from .masks import causal_padding_mask
from .plan import StageSource, compact_position_ids, gather_position_ids, gather_tokens, plan_stage, scatter_back
from .state import CacheRecord, CallState, StageCache, StageInputs

logger = logging.getLogger("pio_fvlm")


DynamicCache = dynamic_cache_class()


def _flash_backend(text_config: Any) -> bool:
    return str(getattr(text_config, "_attn_implementation", None) or "").startswith("flash_attention")


def _offloaded(module: torch.nn.Module) -> bool:
    """True when accelerate offloads the module's weights (they sit on the meta device)."""
    return any(p.device.type == "meta" for p in module.parameters())


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


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


class Runtime:
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
                           open_calls=len(self._tokens) + (self._call.get() is not None))

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

    def _visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: positions holding a visual placeholder id."""
        ids = self.parts.visual_token_ids
        if len(ids) == 1:
            return input_ids == ids[0]
        key = str(input_ids.device)
        if key not in self._id_tensors:  # made once per device: no host-to-device copy per call
            self._id_tensors[key] = torch.tensor(ids, device=input_ids.device)
        return torch.isin(input_ids, self._id_tensors[key])

    def _check_proxy_window(self, shortest: int) -> None:
        """The proxy loss reads K positions before a row's last token (or ending at it): a prompt
        shorter than that has no such window (the authors' slicing would silently use fewer)."""
        window = max(self.windows, key=ProxyWindow.prompt_tokens_needed)
        need = window.prompt_tokens_needed()
        if shortest < need:
            fits = shortest - (0 if window.includes_last else 1)
            raise ValueError(
                f"a prompt of {shortest} tokens is too short for proxy_tokens={window.tokens}: the proxy loss "
                f"reads the {window.tokens} positions before the last token, which needs {need} tokens; wrap "
                f"with proxy_tokens <= {max(fits, 1)} for prompts this short"
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ------------------------------------------------------------------ call boundaries
    def _call_start(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"pio_fvlm needs the 2-D padding attention_mask (batch, sequence) that the processor "
                f"returns; got a {mask.dim()}-D mask. Pass the processor's attention_mask instead."
            )
        visual, n_visual, q_len, all_valid = None, [], 0, True
        if input_ids is not None:
            q_len = input_ids.shape[1]
            if q_len > 1:  # decode steps (one token) never hold visual tokens: no host read there
                visual = self._visual_mask(input_ids)
                shortest = q_len
                if mask is not None:  # one host read for both counts
                    visual_counts, valid_counts = torch.stack((visual, mask[:, -q_len:])).sum(-1).tolist()
                    n_visual = [int(n) for n in visual_counts]  # the mask may be a float tensor
                    shortest = int(min(valid_counts))
                    all_valid = shortest == q_len
                else:
                    n_visual = visual.sum(1).tolist()
                if not any(n_visual):
                    visual = None
                else:
                    self._check_proxy_window(shortest)
        elif kwargs.get("inputs_embeds") is not None:
            q_len = kwargs["inputs_embeds"].shape[1]
            if q_len > 1:
                self._warn_once(
                    "embeds",
                    "pio_fvlm: the model was called with inputs_embeds and no input_ids, so the visual "
                    "tokens cannot be located and nothing is pruned; pass input_ids to prune.",
                )
        cache = layer_cache(kwargs)
        if cache is not None and cache.get_seq_length() == 0:
            with self._lock:
                self._records.pop(cache, None)  # a fresh prefill into a reused cache object
        call = CallState(visual=visual, n_visual=n_visual, attention_mask=mask, q_len=q_len, all_valid=all_valid)
        self._tokens[id(call)] = self._call.set(call)

    def _call_end(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        call = self._call.get()
        if call is None:
            return
        self._call.reset(self._tokens.pop(id(call)))
        if call.record is not None and not call.pruned:
            call.record.full_len += call.q_len
        if call.pruned:
            assert call.visual is not None
            stages = [call.stages[s] for s in range(len(self.stages))]
            self._last = (call.visual, [st.full_index for st in stages if st is not None])
        elif call.visual is not None:
            self._last = (call.visual, [None] * len(self.stages))

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
        hidden = _hidden_of(args, kwargs)
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

    def _last_layer_end(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if PROBING.get():
            return None
        call = self._call.get()
        if call is None or not call.pruned or call.base_hidden is None:
            return None
        final = call.stages[len(self.stages) - 1]
        assert final is not None and final.full_index is not None
        out = output[0] if isinstance(output, tuple) else output
        full = scatter_back(call.base_hidden, out, final.full_index, no_filler=final.all_valid)
        return (full, *output[1:]) if isinstance(output, tuple) else full

    # ------------------------------------------------------------------ stage preparation
    def _prepare_stage(
        self, call: CallState, s: int, i: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StageInputs | None:
        cache = layer_cache(kwargs)
        if call.pruned:  # a later stage of a prefill that pruned already
            return self._prune_stage(call, s, i, _hidden_of(args, kwargs), kwargs, cache)
        with self._lock:
            record = self._records.get(cache) if cache is not None else None
        if record is not None:
            return self._continue_stage(call, record, s, i, _hidden_of(args, kwargs), kwargs)
        if s > 0 or call.visual is None:
            return None
        if cache is not None:
            if not isinstance(cache, DynamicCache):
                raise ValueError(
                    f"pio_fvlm supports the default DynamicCache; got {type(cache).__name__}. Call "
                    f"generate without cache_implementation (or with cache_implementation='dynamic')."
                )
            if cache.get_seq_length(i) > 0:
                self._warn_once(
                    "continued",
                    "pio_fvlm: visual tokens arrived in a call that continues an unpruned KV cache; "
                    "they are kept (only a prefill from an empty cache is pruned).",
                )
                return None
        final_counts = list(call.n_visual)
        for _, budget in self.stages:
            final_counts = [tokens_to_keep(budget, n) for n in final_counts]
        if final_counts == call.n_visual:  # the budget keeps everything: leave the model as it is
            self._warn_once(
                "noop",
                f"pio_fvlm: the budget keeps every visual token of this input ({max(call.n_visual)} at most), "
                f"so nothing is pruned; pass a smaller budget (an int below the visual-token count, or a "
                f"fraction such as budget=0.25) to prune.",
            )
            return None
        return self._prune_stage(call, s, i, _hidden_of(args, kwargs), kwargs, cache)

    def _prune_stage(
        self, call: CallState, s: int, i: int, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any
    ) -> StageInputs:
        """Select this stage's tokens in a prefill and build its layers' inputs."""
        source = self._first_source(call, hidden, kwargs) if s == 0 else self._later_source(call, s, kwargs, cache)
        keep_counts = [tokens_to_keep(self.stages[s][1], n) for n in source.counts]
        if keep_counts == source.counts:  # this stage keeps everything that is left
            return self._pass_through(call, s, i, source, hidden, kwargs, cache)
        keep_visual, replacement = self._select(s, i, source, hidden, keep_counts)
        plan = plan_stage(source, keep_visual, keep_counts, self._all_true)
        if self.config.positions == "keep":
            new_ids = gather_position_ids(source.position_ids, plan.index) if source.position_ids is not None else None
            new_emb = (tuple(gather_tokens(t, plan.index) for t in source.position_embeddings)
                       if source.position_embeddings is not None else None)
        else:
            new_ids = compact_position_ids(source, keep_visual, plan.index)
            new_emb = self.parts.rotary(hidden, new_ids)
        if s == 0:
            call.base_hidden, call.pruned = hidden, True
        removed = [r + c - k for r, c, k in zip(source.removed, source.counts, keep_counts)]
        self._record_stage(call, cache, plan.full_index, removed)
        b, n_new = plan.valid.shape
        padding = None if plan.all_valid else plan.valid
        return StageInputs(
            start_layer=i,
            valid=plan.valid,
            attention_mask=causal_padding_mask(self.parts.text_config, padding, b, n_new, n_new, hidden.dtype,
                                               hidden.device),
            position_ids=new_ids,
            position_embeddings=new_emb,  # type: ignore[arg-type]
            gather_index=plan.index,
            replacement=replacement,
            full_index=plan.full_index,
            counts=keep_counts,
            all_valid=plan.all_valid,
        )

    def _first_source(self, call: CallState, hidden: torch.Tensor, kwargs: dict[str, Any]) -> StageSource:
        """The first stage selects from the full sequence, as the layer receives it."""
        assert call.visual is not None
        b, length = hidden.shape[:2]
        mask = call.attention_mask
        if call.all_valid or mask is None:
            valid = self._all_true(hidden.device, b, length)
        else:
            valid = mask[:, -length:].bool()
        return StageSource(valid=valid, visual=call.visual, counts=call.n_visual, full_index=None,
                           all_valid=call.all_valid, position_ids=kwargs.get("position_ids"),
                           position_embeddings=kwargs.get("position_embeddings"), layer_kwargs=kwargs,
                           removed=[0] * b)

    def _later_source(self, call: CallState, s: int, kwargs: dict[str, Any], cache: Any) -> StageSource:
        """A later stage selects among the survivors of the one before, in its shortened space."""
        prev = call.stages[s - 1]
        assert prev is not None and prev.full_index is not None and call.visual is not None
        full_index = prev.full_index
        pos_ids = prev.position_ids if prev.position_ids is not None else kwargs.get("position_ids")
        pos_emb = prev.position_embeddings
        if pos_emb is None:
            pos_emb = kwargs.get("position_embeddings")
        layer_kwargs = {**kwargs, "attention_mask": prev.attention_mask}
        if pos_ids is not None:
            layer_kwargs["position_ids"] = pos_ids
        if pos_emb is not None:
            layer_kwargs["position_embeddings"] = pos_emb
        assert call.record is not None or cache is None
        b = full_index.shape[0]
        return StageSource(valid=prev.valid, visual=call.visual.gather(1, full_index.clamp(min=0)) & (full_index >= 0),
                           counts=prev.counts or [], full_index=full_index, all_valid=prev.all_valid,
                           position_ids=pos_ids, position_embeddings=pos_emb, layer_kwargs=layer_kwargs,
                           removed=call.record.stages[-1].removed if call.record is not None else [0] * b)

    def _pass_through(self, call: CallState, s: int, i: int, source: StageSource, hidden: torch.Tensor,
                      kwargs: dict[str, Any], cache: Any) -> StageInputs:
        """A stage whose budget keeps every token left: its layers get what the stage before gave."""
        if s > 0:
            prev = call.stages[s - 1]
            assert prev is not None and prev.full_index is not None
            self._record_stage(call, cache, prev.full_index, source.removed)
            return prev
        b, length = hidden.shape[:2]
        call.base_hidden, call.pruned = hidden, True
        identity = torch.arange(length, device=hidden.device).expand(b, length)
        self._record_stage(call, cache, identity, source.removed)
        return StageInputs(start_layer=i, valid=source.valid, attention_mask=kwargs.get("attention_mask"),
                           position_ids=None, position_embeddings=None, full_index=identity, counts=source.counts,
                           all_valid=source.all_valid)

    def _select(self, s: int, i: int, source: StageSource, hidden: torch.Tensor, keep_counts: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run stage ``s``'s selector: the (B, S) kept-visual mask, and replacement hidden states
        when the selector returns some (merging selectors)."""
        query_positions, query_positions_host = self._proxy_positions(source.valid, source.all_valid, self.windows[s])
        request = SelectionRequest(
            probe_inputs=ProbeInputs(
                hidden=hidden,
                valid=source.valid,
                query_positions=query_positions,
                layer_kwargs=source.layer_kwargs,
                position_embeddings=source.position_embeddings,
                query_positions_host=query_positions_host,
                all_valid=source.all_valid,
            ),
            probe_modules=ProbeModules(self.parts.layers[i], self.parts.norm, self.parts.head),
            candidates=source.visual,
            budgets=torch.tensor(keep_counts, device=hidden.device),
            config=self.config,
            probe=self.probes[s] if source.position_embeddings is not None else "full",
            candidate_counts=list(source.counts),
            budget_counts=keep_counts,
        )
        chosen = self.selectors[s](request)
        return chosen if isinstance(chosen, tuple) else (chosen, None)

    def _all_true(self, device: torch.device, b: int, length: int) -> torch.Tensor:
        """A (B, length) all-True mask as a view of one cached element (no kernel per call)."""
        key = str(device)
        if key not in self._true:
            self._true[key] = torch.ones((), dtype=torch.bool, device=device)
        return self._true[key].expand(b, length)

    def _proxy_positions(self, valid: torch.Tensor, all_valid: bool, window: ProxyWindow
                         ) -> tuple[torch.Tensor, np.ndarray | None]:
        """(B, K) proxy positions, and their host copy when every token is real (then they follow
        from the length alone and are built on the host: one copy instead of a dozen small ops)."""
        if not all_valid:
            return proxy_query_positions(valid, window.tokens, window.includes_last), None
        b, length = valid.shape
        end = length - 1 if window.includes_last else length - 2
        row = np.maximum(np.arange(end - window.tokens + 1, end + 1), 0)
        host = np.repeat(row[None, :], b, axis=0)
        return torch.from_numpy(host).to(valid.device), host

    def _record_stage(self, call: CallState, cache: Any, full_index: torch.Tensor, removed: list[int]) -> None:
        """Remember which full positions this stage's cache slots hold (for later calls)."""
        if cache is None:
            return
        if call.record is None:
            call.record = CacheRecord(full_len=call.q_len, stages=[])
            with self._lock:
                self._records[cache] = call.record
        call.record.stages.append(StageCache(full_index=full_index, removed=removed))

    def _continue_stage(
        self, call: CallState, record: CacheRecord, s: int, i: int, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> StageInputs:
        """A call after a pruned prefill: its tokens are all kept; keys follow the record."""
        call.record = record
        sc = record.stages[s]
        b, q = hidden.shape[:2]
        past = record.full_len
        if sc.full_index.shape[0] != b:
            raise ValueError(
                f"this KV cache was pruned for a batch of {sc.full_index.shape[0]} but the call has {b} rows; "
                f"start a new cache for a new batch"
            )
        mask = call.attention_mask
        if mask is None:
            full_mask = hidden.new_ones(b, past + q, dtype=torch.bool)
        elif mask.shape[1] != past + q:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns but the cache holds {past} tokens and the "
                f"call adds {q}: pass the mask of the whole sequence so far ({past + q} columns)"
            )
        else:
            full_mask = mask.bool()
        cached = full_mask.gather(1, sc.full_index.clamp(min=0)) & (sc.full_index >= 0)
        padding = torch.cat([cached, full_mask[:, past:]], dim=1)
        new_positions = torch.arange(past, past + q, device=hidden.device).expand(b, q)
        sc.full_index = torch.cat([sc.full_index, new_positions], dim=1)

        new_ids, new_emb = None, None
        pos_ids = kwargs.get("position_ids")
        if self.config.positions == "compact" and pos_ids is not None:
            new_ids = pos_ids - torch.tensor(sc.removed, device=pos_ids.device).view(b, 1)
            new_emb = self.parts.rotary(hidden, new_ids)
        return StageInputs(
            start_layer=i,
            valid=padding[:, -q:],
            attention_mask=causal_padding_mask(self.parts.text_config, padding, b, q, padding.shape[1], hidden.dtype,
                                               hidden.device),
            position_ids=new_ids,
            position_embeddings=new_emb,
        )
