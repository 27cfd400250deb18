"""Measurement helpers: KV-cache bytes, theoretical FLOPs, synchronised timing, selector timing."""

from __future__ import annotations

import time
from collections.abc import Callable
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


class _FlopCounter(TorchDispatchMode):
    """Sums torch's own per-operator FLOP formulas (FlopCounterMode's registry) over every
    operator dispatched, backward ones included. FlopCounterMode itself tracks modules with
    autograd hooks that break ``torch.autograd.grad`` (which the saliency probe uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = FlopCounterMode(display=False).flop_registry
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = self.registry.get(func._overloadpacket)
        if rule is not None:
            self.total += int(rule(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn``, by torch's FLOP formulas (matrix
    products and attention; element-wise work is not counted). Backward passes run inside,
    such as the saliency probe's, are counted too. Call it outside ``torch.inference_mode``
    (use ``torch.no_grad``): dispatch modes see no operator in inference mode."""
    counter = _FlopCounter()
    with counter:
        fn()
    return counter.total


# Ops that only make views (no kernel on a GPU); matched as substrings of the op's name.
VIEW_OPS = ("view", "unsqueeze", "expand", "slice", "detach", "permute", "aten.t", "squeeze", "transpose",
            "select", "alias", "as_strided", "_reshape_alias", "split", "unbind", "chunk", "narrow", "diagonal")
# Ops that read a device value back to the host (the host waits for the device).
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
            "aten.item", "aten.is_nonzero", "aten.equal")


class LaunchCounter(TorchDispatchMode):
    """Counts the kernel-launching aten ops and the host reads of what runs inside it.

    Kernel ops: every dispatched aten op except those in :data:`VIEW_OPS` (forward and any
    backward). Host reads: the ops in :data:`SYNC_OPS`, plus every ``Tensor.tolist()`` call
    (which on a CPU tensor dispatches nothing but on a GPU tensor waits for the device). The
    figures are the same on CPU and GPU for the same code path. Use outside inference mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.syncs = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        if not any(v in name for v in VIEW_OPS):
            self.kernels += 1
            self.by_op[name] = self.by_op.get(name, 0) + 1
        if name in SYNC_OPS:
            self.syncs += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> LaunchCounter:
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(tensor: torch.Tensor) -> Any:
            counter.syncs += 1
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign, assignment]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)


def count_launches(fn: Callable[[], Any]) -> tuple[int, int]:
    """(kernel-launching ops, host reads) of one call of ``fn`` (see :class:`LaunchCounter`)."""
    with LaunchCounter() as counter:
        fn()
    return counter.kernels, counter.syncs


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

    def __call__(self, request: Any) -> torch.Tensor:
        synchronize()
        start = time.perf_counter()
        out = self.inner(request)
        synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out
