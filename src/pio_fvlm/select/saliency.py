"""PIO-FVLM step 1: layer-local proxy loss and gradient saliency.

The probe runs one decoder layer on detached hidden states, then the model's final norm and
prediction head, takes cross-entropy against the model's own argmax at K prompt positions, and
scores each token by the L2 norm of the loss gradient with respect to its hidden state.

Two exact implementations:

* :func:`full_layer_saliency` calls the real decoder layer on the whole sequence (any layer
  type); the head runs only at the K loss positions (the loss reads nothing else).
* :func:`fast_saliency` exploits causality: the K outputs the loss reads depend on the other
  tokens only through their keys and values, so queries, attention output, residual, MLP,
  norm and head are computed at the K positions alone. Same gradients, a fraction of the work.
  It needs a Llama-style layer (see :func:`supports_fast_probe`).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..compat import CACHE_KEYWORDS, function_parameters, rotary_function
from ..tensor_ops import gather_tokens

# Set while the probe calls a decoder layer, so that our own layer hooks stand aside.
PROBING: contextvars.ContextVar[bool] = contextvars.ContextVar("pio_fvlm_probing", default=False)

PositionEmbeddings = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ProbeInputs:
    """What the prune layer would receive, in the current (possibly already pruned) space.

    Attributes:
        hidden: (B, S, D) hidden states entering the probe layer.
        valid: (B, S) bool, real tokens (False for padding / filler slots).
        query_positions: (B, K) long, positions whose predictions form the proxy loss.
        layer_kwargs: keyword arguments the layer receives (mask, position embeddings, ...);
            used as they are by the full-layer probe.
        position_embeddings: (cos, sin), each (B or 1, S, head_dim), or None.
        query_positions_host: ``query_positions`` as a host array when the caller has it (it
            spares the probe device ops that only rebuild host-known values), else None.
        all_valid: True when the caller knows that every token is real (no padding, no filler).
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    query_positions: torch.Tensor
    layer_kwargs: dict[str, Any]
    position_embeddings: PositionEmbeddings | None
    query_positions_host: np.ndarray | None = None
    all_valid: bool = False


@dataclass
class ProbeModules:
    """The pretrained pieces the probe runs: one decoder layer, the final norm, the head."""

    layer: nn.Module
    norm: nn.Module
    head: nn.Module


def proxy_query_positions(valid: torch.Tensor, k: int, include_last: bool) -> torch.Tensor:
    """The K positions of each row whose predictions enter the proxy loss.

    The authors' code shifts logits like a training loss, so by default these are the K
    positions before the last valid one (L-5 .. L-2 for K=4 and valid length L).

    Args:
        valid: (B, S) bool.
    Returns:
        (B, K) long, clamped to the row's first valid position for very short prompts.
    """
    s = valid.shape[1]
    ar = torch.arange(s, device=valid.device)
    last = torch.where(valid, ar, -1).amax(1)
    first = torch.where(valid, ar, s).amin(1)
    end = last if include_last else last - 1
    pos = end.unsqueeze(1) - (k - 1) + torch.arange(k, device=valid.device)
    return torch.maximum(pos, first.unsqueeze(1))


def proxy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, K, V) logits against their own argmax: mean over K, summed over B.

    Summing over the batch keeps each sample's gradient equal to its gradient run alone.
    """
    b, k, v = logits.shape
    logits = logits.float()
    labels = logits.detach().argmax(-1)
    ce = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none")
    return ce.view(b, k).mean(1).sum()


def _detached_leaf(x: torch.Tensor) -> torch.Tensor:
    # clone() outside inference mode turns an inference tensor into one autograd accepts.
    return x.detach().clone().requires_grad_(True)


def _clone_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(_clone_tree(v) for v in x)
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    return x


def _saliency_from(loss_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """Run ``loss_fn`` on a detached copy of ``hidden`` and return ||dLoss/dx_j||_2 as (B, S) fp32."""
    with torch.inference_mode(False), torch.enable_grad():
        x = _detached_leaf(hidden)
        loss = loss_fn(x)
        # Only the input gradient: autograd.grad computes no weight gradients and frees the graph.
        (grad,) = torch.autograd.grad(loss, x)
    return grad.float().norm(dim=-1).detach()


def run_layer_on(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
    """The real decoder layer on ``x`` with the model's own kwargs, without touching the KV
    cache and with our hooks standing aside. Returns its (B, S, D) output."""
    kwargs = _clone_tree(layer_kwargs)  # clones: inference tensors become usable by autograd
    kwargs.update({CACHE_KEYWORDS[0]: None, "use_cache": False})
    for name in CACHE_KEYWORDS[1:]:
        kwargs.pop(name, None)
    token = PROBING.set(True)
    try:
        out = layer(x, **kwargs)
    finally:
        PROBING.reset(token)
    return out[0] if isinstance(out, tuple) else out


def full_layer_saliency(mods: ProbeModules, inp: ProbeInputs) -> torch.Tensor:
    """Exact saliency by calling the real decoder layer on the whole sequence. Returns (B, S)."""

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        y = run_layer_on(mods.layer, x, inp.layer_kwargs)
        y_q = gather_tokens(y, inp.query_positions.clone())
        return proxy_loss(mods.head(mods.norm(y_q)))

    return _saliency_from(loss_fn, inp.hidden)


_FAST_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_FAST_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_QK_NORMS = {"q_norm", "k_norm"}  # per-head norms of queries and keys (Qwen3), applied before the rotary


@functools.cache
def _takes_unsqueeze_dim(rotary: Callable[..., Any]) -> bool:
    # once per rotary function, not per prefill: signature inspection is slow
    return "unsqueeze_dim" in function_parameters(rotary)


def _rotate_tokens_major(rotary: Callable[..., Any], x: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
    """The model's own rotary on (B, T, heads, hd) laid out tokens-major, cos/sin (B, T, hd).

    Tokens-major keeps every elementwise op and its backward on contiguous memory (the
    heads-major transpose made them strided, and on CPU they cost as much as the key matmul).
    HF's function rotates two tensors; the second slot gets a one-head slice, a small waste.
    """
    if _takes_unsqueeze_dim(rotary):
        return rotary(x, x[:, :, :1], cos, sin, unsqueeze_dim=2)[0]
    heads_major = x.transpose(1, 2)
    return rotary(heads_major, heads_major[:, :1], cos, sin)[0].transpose(1, 2)


def rotated_queries_keys(attn: Any, xn: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama-style attention's queries at a few rows and keys of every token, from its own
    projections, q/k norms (Qwen3) and rotary, tokens-major.

    Args:
        attn: the layer's ``self_attn`` (q_proj, k_proj, head_dim; q_norm / k_norm if present).
        xn: (B, S, D) the attention's input (after the layer's input norm).
        rows: (B, P) the query positions.
        cos, sin: (B or 1, S, hd) the layer's rotary tables.
    Returns:
        q: (B, P, H, hd); k: (B, S, H_kv, hd).
    """
    rotary = rotary_function(attn)
    if rotary is None:
        raise ValueError(f"{type(attn).__name__} has no apply_rotary_pos_emb in its module: its queries and keys "
                         f"cannot be recomputed here (the PIO-FVLM selector's full-layer probe takes any layer)")
    b, s, _ = xn.shape
    hd = attn.head_dim
    q = attn.q_proj(gather_tokens(xn, rows)).view(b, rows.shape[1], -1, hd)
    k = attn.k_proj(xn).view(b, s, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head norms of queries and keys before the rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = _rotate_tokens_major(rotary, q, gather_tokens(cos, rows), gather_tokens(sin, rows))
    return q, _rotate_tokens_major(rotary, k, cos, sin)


def supports_fast_probe(layer: nn.Module) -> bool:
    """True for a Llama-style pre-norm layer: exactly these children (q/k norms allowed), any MLP
    module (it runs on the K proxy positions only: a mixture of experts routes each token on its
    own), and a standard rotary."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or {n for n, _ in layer.named_children()} != _FAST_LAYER_CHILDREN:
        return False
    if {n for n, _ in attn.named_children()} not in (_FAST_ATTN_CHILDREN, _FAST_ATTN_CHILDREN | _QK_NORMS):
        return False
    if getattr(attn, "sliding_window", None) is not None:
        return False
    needed = ("head_dim", "scaling", "num_key_value_groups")
    return all(hasattr(attn, a) for a in needed) and rotary_function(attn) is not None


def fast_saliency(mods: ProbeModules, inp: ProbeInputs) -> torch.Tensor:
    """Exact saliency with queries, MLP and head only at the K loss positions. Returns (B, S).

    Keys are computed for every token (rotary positions make them unavoidable). Values are
    not: the attention output of a query is ``W_v @ sum_j p_j xn_j + b_v`` (the weights sum to
    one), so the probe forms the K attention-weighted inputs and projects those, which makes the
    value path, forward and backward, cost K instead of S tokens. Requires
    ``supports_fast_probe(mods.layer)`` and position embeddings.
    """
    layer: Any = mods.layer  # HF modules: attributes are dynamic
    attn: Any = layer.self_attn
    assert rotary_function(attn) is not None and inp.position_embeddings is not None
    b, s, d = inp.hidden.shape
    k_count = inp.query_positions.shape[1]
    hd = attn.head_dim
    groups = attn.num_key_value_groups
    v_proj = attn.v_proj
    values_by_weight = type(v_proj) is nn.Linear  # a plain Linear: its weight can be used directly

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        # Runs outside inference mode: clones make inference tensors usable by autograd.
        qpos = inp.query_positions.clone()
        cos, sin = (t.detach().clone() for t in inp.position_embeddings)  # type: ignore[union-attr]
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        key_pos = torch.arange(s, device=qpos.device)
        allowed = inp.valid.clone().unsqueeze(2) & (key_pos.view(1, s, 1) <= qpos.unsqueeze(1))  # (B, S, K)
        xn = layer.input_layernorm(x)
        q, k = rotated_queries_keys(attn, xn, qpos, cos, sin)  # (B, K, H, hd), (B, S, Hkv, hd)
        n_kv = k.shape[2]
        # All heads' scores in one plain matmul: keys (B, S, Hkv*hd) times the queries laid out
        # block-diagonally (B, Hkv*hd, H*K); column h*K + i is query i of head h (HF order
        # h = kv * groups + g). The zero blocks cost H*K columns, far less than the key projection.
        qt = q.view(b, k_count, n_kv, groups, hd).permute(0, 2, 4, 3, 1)  # (B, Hkv, hd, groups, K)
        eye = torch.eye(n_kv, dtype=q.dtype, device=q.device)
        q_blocks = torch.einsum("bndgk,nm->bndmgk", qt, eye).reshape(b, n_kv * hd, n_kv * groups * k_count)
        scores = (k.reshape(b, s, n_kv * hd) @ q_blocks) * attn.scaling  # (B, S, H*K)
        blocked = ~allowed.unsqueeze(2).expand(b, s, n_kv * groups, k_count).reshape(b, s, -1)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=1, dtype=torch.float32).to(q.dtype)  # over keys
        if values_by_weight:
            # attention-weighted inputs of every (head, query): one (B, H*K, S) @ (B, S, D) product
            mixed = (probs.transpose(1, 2) @ xn).view(b, n_kv, groups * k_count, d)
            o = torch.einsum("bnqd,ned->bnqe", mixed, v_proj.weight.view(n_kv, hd, d))
            if v_proj.bias is not None:
                o = o + v_proj.bias.view(1, n_kv, 1, hd)
        else:
            v = v_proj(xn).view(b, s, n_kv, hd)
            o = torch.einsum("bsnq,bsne->bnqe", probs.view(b, s, n_kv, groups * k_count), v)
        # (B, Hkv, groups, K, hd) -> (B, K, H * hd) with heads in HF order
        o = o.view(b, n_kv, groups, k_count, hd).permute(0, 3, 1, 2, 4).reshape(b, k_count, -1)
        h = gather_tokens(x, qpos) + attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return proxy_loss(mods.head(mods.norm(h)))

    return _saliency_from(loss_fn, inp.hidden)
