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
