"""A plain-torch stand-in for flash-attn 2.x, so that transformers' own FlashAttention-2 code path
(its unpadding, ``cu_seqlens``, packed-sequence detection from ``position_ids``) runs on a CPU.

``flash_attention_2_standin()`` puts a ``flash_attn`` module with ``flash_attn_func``,
``flash_attn_varlen_func``, ``flash_attn_with_kvcache`` and ``bert_padding.pad_input /
unpad_input`` into ``sys.modules`` and tells transformers' FlashAttention utilities that
flash-attn 2 is available (their check wants a CUDA device); ``use_flash_attention_2(model)``
switches a model built with another backend to ``"flash_attention_2"``.

The functions follow flash-attn >= 2.1: batch-major ``(B, S, H, D)`` or packed ``(total, H, D)``
inputs, grouped-query heads (``H`` a multiple of the key/value heads), and a causal mask aligned
to the bottom right when query and key lengths differ (query ``i`` of ``Sq`` sees key ``j`` of
``Sk`` when ``j <= i + Sk - Sq``; a query that sees no key gets zeros). Computed in float32.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

import torch

VERSION = "2.8.3"  # the flash-attn release whose signatures these follow


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None,
            causal: bool) -> torch.Tensor:
    """One sequence: q (Sq, H, D), k / v (Sk, Hkv, D) -> (Sq, H, D)."""
    sq, heads, dim = q.shape
    sk, kv_heads = k.shape[0], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    group = heads // kv_heads
    qf = q.float().transpose(0, 1)                                   # (H, Sq, D)
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)   # (H, Sk, D)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scale = softmax_scale if softmax_scale is not None else dim ** -0.5
    scores = qf @ kf.transpose(1, 2) * scale                         # (H, Sq, Sk)
    if causal:
        rows = torch.arange(sq).unsqueeze(1)
        cols = torch.arange(sk).unsqueeze(0)
        allowed = cols <= rows + (sk - sq)                           # bottom-right aligned
        scores = scores.masked_fill(~allowed, float("-inf"))
        sees_some = allowed.any(1)                                   # (Sq,)
    else:
        sees_some = torch.ones(sq, dtype=torch.bool)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (probs @ vf).transpose(0, 1)                               # (Sq, H, D)
    out = out * sees_some.view(sq, 1, 1)
    return out.to(q.dtype)


def _refuse_unsupported(dropout_p: float, window_size: tuple[int, int], softcap: float, alibi_slopes: object,
                        return_attn_probs: bool) -> None:
    if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("the flash-attn stand-in computes plain (causal) attention only: no dropout, "
                                  "sliding window, softcap, ALiBi or returned probabilities")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, H, D), k / v (B, Sk, Hkv, D) -> (B, Sq, H, D)."""
    _refuse_unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs)
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, H, D), k / v (total_k, Hkv, D), ``cu_seqlens_*`` (N + 1,) int32
    offsets of the N sequences -> (total_q, H, D)."""
    _refuse_unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs)
    if block_table is not None:
        raise NotImplementedError("the flash-attn stand-in has no paged KV cache")
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(bounds_q) != len(bounds_k):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    out = torch.zeros_like(q)
    for i in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[i:i + 2], bounds_k[i:i + 2]
        if q1 - q0 > max_seqlen_q or k1 - k0 > max_seqlen_k:
            raise ValueError("a sequence is longer than max_seqlen_q / max_seqlen_k")
        out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, causal)
    return out


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the flash-attn stand-in has no paged KV cache")


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """(B, S, ...) and a (B, S) mask of real tokens -> (the real tokens (total, ...), their flat
    indices, cu_seqlens (B + 1,) int32, the longest length, the lengths (B,) int32)."""
    lengths = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, int(lengths.max()), lengths


def pad_input(hidden_states, indices, batch, seqlen):
    """The inverse of :func:`unpad_input`: (total, ...) -> (batch, seqlen, ...), zeros at padding."""
    out = torch.zeros(batch * seqlen, *hidden_states.shape[1:], dtype=hidden_states.dtype,
                      device=hidden_states.device)
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def _modules() -> dict[str, types.ModuleType]:
    package = types.ModuleType("flash_attn")
    package.__version__ = VERSION  # type: ignore[attr-defined]
    package.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
    package.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    package.flash_attn_with_kvcache = flash_attn_with_kvcache  # type: ignore[attr-defined]
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input = pad_input  # type: ignore[attr-defined]
    padding.unpad_input = unpad_input  # type: ignore[attr-defined]
    package.bert_padding = padding  # type: ignore[attr-defined]
    return {"flash_attn": package, "flash_attn.bert_padding": padding}


def _reset_loaded_implementation(utils: types.ModuleType) -> None:
    # transformers keeps the functions it imported for the last implementation; forget them
    if hasattr(utils, "_loaded_implementation"):
        utils._loaded_implementation = None


@contextlib.contextmanager
def flash_attention_2_standin() -> Iterator[None]:
    """Inside the block, transformers' FlashAttention-2 path runs on the stand-in functions."""
    from transformers import modeling_flash_attention_utils as utils

    saved_modules = {name: sys.modules.get(name) for name in ("flash_attn", "flash_attn.bert_padding")}
    saved_check = utils.is_flash_attn_2_available
    sys.modules.update(_modules())
    utils.is_flash_attn_2_available = lambda *args, **kwargs: True
    _reset_loaded_implementation(utils)
    try:
        yield
    finally:
        utils.is_flash_attn_2_available = saved_check
        _reset_loaded_implementation(utils)
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def use_flash_attention_2(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` (built with another backend) to ``"flash_attention_2"`` in every config.

    ``from_pretrained(attn_implementation="flash_attention_2")`` would refuse without CUDA; the
    attention layers and mask functions read the setting at each call, so setting it is enough.
    """
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        for sub in [config, *(getattr(config, name, None) for name in getattr(config, "sub_configs", {}))]:
            if sub is not None:
                sub._attn_implementation = "flash_attention_2"
    return model
