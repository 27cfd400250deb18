"""Opt-in capture of the probe: one compiled graph per shape bucket (``wrap(..., capture=True)``).

At batch 1 on a fast GPU even the closed-form probe's ~100 small kernels cost more host time
than the GPU needs to run them. ``torch.compile(mode="reduce-overhead")`` fuses them and, on
CUDA, replays the result as a CUDA graph: one launch for the whole probe. A graph is made for
fixed shapes, so the probe's inputs are padded to a bucket of :data:`BUCKET` tokens (padded keys
are masked out and get zero saliency, so the result is the same); prompts whose lengths fall in
one bucket share one graph. The first prefill of each bucket pays the compilation (seconds).

Off by default: compilation takes time, needs a working ``torch.compile`` (a C++ compiler on
CPU, Triton on GPU), and on CPU it only fuses kernels. Equal to the eager closed-form probe up
to float rounding (tested on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .closed_form import key_bias, saliency_core
from .saliency import ProbeInputs, ProbeModules

BUCKET = 256  # tokens; a prompt of S tokens runs the graph of ceil(S / BUCKET) * BUCKET

_compiled: Callable[..., torch.Tensor] | None = None


def _compiled_core() -> Callable[..., torch.Tensor]:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(saliency_core, mode="reduce-overhead", dynamic=False, fullgraph=True)
    return _compiled


def bucket_length(s: int) -> int:
    """The padded length a prompt of ``s`` tokens runs at."""
    return -(-s // BUCKET) * BUCKET


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of ``t`` to ``length``."""
    extra = length - t.shape[1]
    if extra == 0:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)


def captured_saliency(mods: ProbeModules, inp: ProbeInputs) -> torch.Tensor:
    """:func:`.closed_form.closed_form_saliency` through the compiled, bucketed graph. (B, S) fp32."""
    assert inp.position_embeddings is not None
    s = inp.hidden.shape[1]
    length = bucket_length(s)
    cos, sin = (_pad(t, length) for t in inp.position_embeddings)
    args: tuple[Any, ...] = (mods.layer, mods.norm, mods.head, _pad(inp.hidden, length), inp.query_positions,
                             cos, sin, key_bias(inp, length))
    with torch.no_grad():
        out = _compiled_core()(*args)
    # the graph's output buffer is reused by the next replay: keep a copy of the part we need
    return out[:, :s].clone()
