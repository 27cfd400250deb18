"""Measurement helpers: KV-cache bytes, theoretical FLOPs, synchronised timing, selector timing, the
sequence length each decoder layer receives."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued device work (no-op on CPU), so wall-clock timings are real."""
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


def kv_cache_bytes(cache: Any) -> tuple[int, list[int]]:
    """Total bytes of keys and values held by a transformers ``Cache``, and per layer."""
    per_layer = []
    for layer in getattr(cache, "layers", []):
        total = 0
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        per_layer.append(total)
    return sum(per_layer), per_layer


# Ops that only make views (no kernel on a GPU); matched as substrings of the op's name.
VIEW_OPS = ("view", "unsqueeze", "expand", "slice", "detach", "permute", "aten.t", "squeeze", "transpose",
            "select", "alias", "as_strided", "_reshape_alias", "split", "unbind", "chunk", "narrow", "diagonal")
# Ops that read a device value back to the host (the host waits for the device).
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
            "aten.item", "aten.is_nonzero", "aten.equal")


class OpStats(TorchDispatchMode):
    """What the code run inside it dispatches, in one pass (forward and any backward):

    * ``kernels``: aten ops except those in :data:`VIEW_OPS` (each launches a kernel on a GPU);
    * ``syncs``: host reads: the ops in :data:`SYNC_OPS` and every ``Tensor.tolist()`` call (which
      on a CPU tensor dispatches nothing but on a GPU tensor waits for the device);
    * ``flops``: torch's per-operator FLOP formulas (matrix products and attention; element-wise
      work is not counted). FlopCounterMode itself tracks modules with autograd hooks that break
      ``torch.autograd.grad`` (which the autograd probes use);
    * ``peak_bytes``: the most bytes held at once by storages created inside (weights and inputs
      made before are not counted): the transient memory of the call, on any device.
      :meth:`window` measures the peak of a part of the call above what was held when it began.

    The counts are the same on CPU and GPU for the same code path. Use outside
    ``torch.inference_mode`` (dispatch modes see no operator there): use ``torch.no_grad``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.syncs = 0
        self.flops = 0
        self.by_op: dict[str, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._window_start: int | None = None
        self.window_peak_bytes = 0
        self._storages: dict[int, int] = {}
        self._flop_rules = FlopCounterMode(display=False).flop_registry

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        if not any(v in name for v in VIEW_OPS):
            self.kernels += 1
            self.by_op[name] = self.by_op.get(name, 0) + 1
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):  # views allocate nothing (they may alias older tensors)
                    self._track(t)
        if name in SYNC_OPS:
            self.syncs += 1
        rule = self._flop_rules.get(func._overloadpacket)
        if rule is not None:
            self.flops += int(rule(*args, **kwargs, out_val=out))
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not key or key in self._storages:
            return
        self._storages[key] = storage.nbytes()
        self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self._window_start is not None:
            self.window_peak_bytes = max(self.window_peak_bytes, self.live_bytes - self._window_start)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live_bytes -= self._storages.pop(key, 0)

    @contextmanager
    def window(self) -> Iterator[None]:
        """Inside: ``window_peak_bytes`` grows to the peak held above the bytes held at entry."""
        self._window_start = self.live_bytes
        try:
            yield
        finally:
            self._window_start = None

    def __enter__(self) -> OpStats:
        self._tolist = torch.Tensor.tolist
        stats = self

        def tolist(tensor: torch.Tensor) -> Any:
            stats.syncs += 1
            return stats._tolist(tensor)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign, assignment]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)


def count_launches(fn: Callable[[], Any]) -> tuple[int, int]:
    """(kernel-launching ops, host reads) of one call of ``fn`` (see :class:`OpStats`)."""
    with OpStats() as stats:
        fn()
    return stats.kernels, stats.syncs


def pre_hook_seconds(layers: Any, fn: Callable[[], Any]) -> dict[int, float]:
    """Seconds spent, per module of ``layers``, in the forward pre-hooks already registered on it
    (pio_fvlm's), during one call of ``fn``: host time that a launch-bound GPU pays as well."""
    started: dict[int, float] = {}
    spent: dict[int, float] = {}

    def start(i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            started[i] = time.perf_counter()

        return hook

    def stop(i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            spent[i] = spent.get(i, 0.0) + time.perf_counter() - started[i]

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(start(i), prepend=True))
        handles.append(layer.register_forward_pre_hook(stop(i)))
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return spent


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds for one synchronised call of ``fn``, and its result."""
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    return time.perf_counter() - start, out


class TimedSelector:
    """Wraps a selector and accumulates the seconds spent in it (probe + NMS)."""

    def __init__(self, inner: Callable[[Any], torch.Tensor]) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0
        self.stats: OpStats | None = None  # when set, the selection's memory peak is measured in it

    def __call__(self, request: Any) -> torch.Tensor:
        synchronize()
        start = time.perf_counter()
        if self.stats is not None:
            with self.stats.window():
                out = self.inner(request)
        else:
            out = self.inner(request)
        synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


@contextmanager
def layer_lengths(model: Any) -> Iterator[dict[int, int]]:
    """Records the sequence length each decoder layer of ``model.model.language_model`` receives
    (registered after pio_fvlm's hooks, so it sees what the layer really gets). Yields
    {layer index: length}, filled by the forward calls inside the block. ``model``: a transformers
    VLM (``model.model.language_model.layers``)."""
    seen: dict[int, int] = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True
        )
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
