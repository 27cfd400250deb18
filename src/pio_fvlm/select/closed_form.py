"""The probe's input gradient in closed form: the same saliency as autograd, in fewer, larger ops.

On a GPU at batch 1 a prefill is bound by kernel launches, so the probe's cost is its number of
dispatched ops more than its FLOPs. Autograd replays every forward op with one or two backward
ops and clones its inputs out of inference mode; here the backward of one Llama-style decoder
layer, the final norm, the head and the proxy loss is written out as a handful of matrix
products, with no autograd graph at all.

Notation (shapes): B batch, S tokens, D hidden, H query heads, N key/value heads, G = H / N,
d head size, K proxy positions, V vocabulary. Queries, attention output, MLP, norm and head are
needed at the K proxy positions only (causality: the other tokens reach the loss only through
their keys and values), so everything of length S is: the input norm, the key projection and
its rotary, one (H*K, S) attention map, and their backward.

The value path needs no per-token values: a query's attention output is ``W_v m + b_v`` with
``m = sum_j p_j xn_j`` (weights sum to one), and the loss gradient reaches token j's normed input
as ``sum_h p_hj u_h`` with ``u_h = W_v,h^T dL/do_h``; the softmax backward needs
``dL/dp_hj = u_h . xn_j`` (the value bias cancels in it).

Supported: pre-norm layers with RMSNorm (HF's formula), q/k/v/o projections (bias or not, GQA),
optional per-head RMSNorms on queries and keys before the rotary (Qwen3's q/k norms), the
standard rotate-half rotary, and a gated SiLU MLP (gate/up/down): LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense), InternVL. :func:`supports_closed_form`
says whether a layer qualifies; the others (e.g. mixture-of-experts MLPs) use the autograd
probes of :mod:`.saliency`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..tensor_ops import gather_tokens
from .saliency import ProbeInputs, ProbeModules, supports_fast_probe

_SILU = ("SiLU", "SiLUActivation")
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


def _is_rms_norm(norm: Any) -> bool:
    """HF's RMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps))`` with the weight as is."""
    return (
        type(norm).__name__.endswith("RMSNorm")
        and isinstance(getattr(norm, "weight", None), torch.Tensor)
        and isinstance(getattr(norm, "variance_epsilon", None), float)
        and not list(norm.children())
    )


def supports_closed_form(layer: nn.Module, norm: nn.Module, head: nn.Module) -> bool:
    """True when the closed-form probe computes exactly what this layer, norm and head do."""
    if not supports_fast_probe(layer):  # the attention layout and rotary (q/k norms allowed)
        return False
    lay: Any = layer
    attn = lay.self_attn
    if hasattr(attn, "q_norm") and not (_is_rms_norm(attn.q_norm) and _is_rms_norm(attn.k_norm)):
        return False
    mlp = lay.mlp
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, head]
    if {n for n, _ in mlp.named_children()} != _MLP_CHILDREN:
        return False
    linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(m) is not nn.Linear for m in linears) or head.bias is not None:
        return False
    if type(mlp.act_fn).__name__ not in _SILU:
        return False
    return all(_is_rms_norm(n) for n in (lay.input_layernorm, lay.post_attention_layernorm, norm))


# ---------------------------------------------------------------------------------- pieces
def _rms_forward(norm: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's RMSNorm on (..., D), and what its backward needs: (output, x * r in fp32, r (..., 1))."""
    x32 = x.to(torch.float32)
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    xr = x32 * r
    return norm.weight * xr.to(x.dtype), xr, r


def _rms_backward(norm: Any, grad: torch.Tensor, xr: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """d(input) of :func:`_rms_forward` for d(output) ``grad`` (in fp32, as autograd does).
    Works in ``grad``'s memory (the probe's own buffer, not needed afterwards)."""
    dtype = grad.dtype
    gw = grad.mul_(norm.weight).to(torch.float32)
    # mean over D of gw * xr as a batched dot product: no (..., D) temporary
    mean = (gw.unsqueeze(-2) @ xr.unsqueeze(-1)).squeeze(-1).div_(xr.shape[-1])
    return gw.addcmul_(xr, mean, value=-1.0).mul_(r).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (HF's rotary), cos / sin broadcast over heads."""
    return torch.addcmul(_rotate_half(x) * sin, x, cos)


def _rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """d(x) of :func:`_rope`: ``grad * cos + rotate_half^T(grad * sin)``, rotate_half^T(y) = (y2, -y1)."""
    y = grad * sin
    half = y.shape[-1] // 2
    return torch.addcmul(torch.cat((y[..., half:], -y[..., :half]), dim=-1), grad, cos)


def key_bias(inp: ProbeInputs, s: int) -> torch.Tensor:
    """(B, K, S) fp32: 0 where proxy query k may attend key s (valid, causal), else the fp32 minimum.
    ``s`` may exceed the inputs' length (padding to a captured shape): those keys are masked."""
    qpos = inp.query_positions
    low = torch.finfo(torch.float32).min
    host = inp.query_positions_host
    if host is not None and inp.all_valid and s == inp.hidden.shape[1]:
        # Built on the host when every token is real: one copy instead of four device ops.
        bias = np.where(np.arange(s)[None, None, :] <= host[:, :, None], 0.0, low).astype(np.float32)
        return torch.from_numpy(bias).to(qpos.device)
    valid = inp.valid
    if s > valid.shape[1]:
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], s - valid.shape[1])], dim=1)
    allowed = (torch.arange(s, device=qpos.device) <= qpos.unsqueeze(2)) & valid.unsqueeze(1)
    return torch.where(allowed, 0.0, low)


# ---------------------------------------------------------------------------------- the probe
def closed_form_saliency(mods: ProbeModules, inp: ProbeInputs) -> torch.Tensor:
    """||dLoss/dx_j||_2 for every token j, as (B, S) fp32, without autograd.

    Equal to :func:`.saliency.fast_saliency` and :func:`.saliency.full_layer_saliency` up to
    float rounding; needs ``supports_closed_form`` and position embeddings.
    """
    assert inp.position_embeddings is not None
    cos, sin = inp.position_embeddings
    return saliency_core(mods.layer, mods.norm, mods.head, inp.hidden, inp.query_positions, cos, sin,
                         key_bias(inp, inp.hidden.shape[1]))


@torch.no_grad()
def saliency_core(layer: Any, norm: Any, head: Any, x: torch.Tensor, qpos: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The closed-form probe on plain tensors (what a captured graph runs).

    Args:
        x: (B, S, D) hidden states entering ``layer``; qpos: (B, K) proxy positions;
        cos, sin: (B or 1, S, d) rotary tables; bias: (B, K, S) fp32 key mask (:func:`key_bias`).
    Returns:
        (B, S) fp32 saliency.
    """
    attn: Any = layer.self_attn
    mlp: Any = layer.mlp
    b, s, dim = x.shape
    k_count = qpos.shape[1]
    hd, groups, scale = attn.head_dim, attn.num_key_value_groups, attn.scaling
    n_kv = attn.k_proj.out_features // hd
    n_q = n_kv * groups
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)  # (B, S, d)
    cos_q, sin_q = gather_tokens(cos, qpos), gather_tokens(sin, qpos)  # (B, K, d)

    # ---- forward, S tokens: input norm, keys; K tokens: queries
    xn, xr1, r1 = _rms_forward(layer.input_layernorm, x)  # (B, S, D)
    qk_norms = hasattr(attn, "q_norm")  # Qwen3: per-head RMSNorm of queries and keys before the rotary
    q = attn.q_proj(gather_tokens(xn, qpos)).view(b, k_count, n_q, hd)
    if qk_norms:
        q, qxr, qr = _rms_forward(attn.q_norm, q)
    q = _rope(q, cos_q.unsqueeze(2), sin_q.unsqueeze(2))  # (B, K, H, d)
    k = attn.k_proj(xn).view(b, s, n_kv, hd)
    if qk_norms:
        k, kxr, kr = _rms_forward(attn.k_norm, k)
    k = _rope(k, cos.unsqueeze(2), sin.unsqueeze(2))  # (B, S, N, d)
    # rows of each key/value group: (g, k) -> (B, N, G*K, d); keys (B, N, d, S)
    q_groups = q.view(b, k_count, n_kv, groups, hd).permute(0, 2, 3, 1, 4).reshape(b, n_kv, groups * k_count, hd)
    keys_t = k.permute(0, 2, 3, 1)
    scores = (q_groups @ keys_t).view(b, n_kv, groups, k_count, s)
    logits = torch.add(bias.view(b, 1, 1, k_count, s), scores, alpha=scale)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype).view(b, n_q * k_count, s)
    mixed = probs @ xn  # (B, H*K, D): attention-weighted inputs, rows (n, g, k)
    del xn  # (B, S, D): the probe's memory peak is a few tensors of this size; xr1 stands in below

    # ---- forward, K tokens: values, output projection, MLP, norm, head
    w_v = attn.v_proj.weight.view(n_kv, hd, dim)
    mixed_by_group = mixed.view(b, n_kv, groups * k_count, dim).transpose(0, 1).reshape(n_kv, -1, dim)
    if attn.v_proj.bias is not None:
        out = torch.baddbmm(attn.v_proj.bias.view(n_kv, 1, hd), mixed_by_group, w_v.transpose(1, 2))
    else:
        out = mixed_by_group @ w_v.transpose(1, 2)  # (N, B*G*K, d)
    out = out.view(n_kv, b, groups, k_count, hd).permute(1, 3, 0, 2, 4).reshape(b, k_count, n_q * hd)
    h = gather_tokens(x, qpos) + attn.o_proj(out)  # (B, K, D)
    hn, xr2, r2 = _rms_forward(layer.post_attention_layernorm, h)
    gate, up = mlp.gate_proj(hn), mlp.up_proj(hn)
    act = mlp.act_fn(gate)
    h2 = h + mlp.down_proj(act * up)
    zn, xr3, r3 = _rms_forward(norm, h2)
    vocab_logits = head(zn).float().view(b * k_count, -1)  # (B*K, V)

    # ---- backward, K tokens: cross-entropy against the argmax, mean over K per sample
    grad_logits = torch.softmax(vocab_logits, dim=-1)
    top = vocab_logits.argmax(-1, keepdim=True)
    grad_logits.scatter_add_(1, top, torch.full_like(grad_logits[:, :1], -1.0))
    grad_zn = torch.addmm(zn.view(b * k_count, dim), grad_logits.to(x.dtype), head.weight, beta=0,
                          alpha=1.0 / k_count)
    grad_h2 = _rms_backward(norm, grad_zn.view(b, k_count, dim), xr3, r3)
    grad_m = grad_h2 @ mlp.down_proj.weight  # (B, K, I)
    grad_gate = torch.ops.aten.silu_backward(grad_m * up, gate)
    grad_hn = torch.addmm(grad_gate.view(b * k_count, -1) @ mlp.gate_proj.weight,
                          (grad_m * act).view(b * k_count, -1), mlp.up_proj.weight)
    grad_h = grad_h2 + _rms_backward(layer.post_attention_layernorm, grad_hn.view(b, k_count, dim), xr2, r2)
    grad_out = (grad_h @ attn.o_proj.weight).view(b, k_count, n_kv, groups, hd)
    # u = W_v^T dL/d(out) per head, rows (n, g, k) like `mixed`: (B, H*K, D)
    grad_out_by_group = grad_out.permute(2, 0, 3, 1, 4).reshape(n_kv, -1, hd)
    u = (grad_out_by_group @ w_v).view(n_kv, b, groups * k_count, dim).transpose(0, 1).reshape(b, -1, dim)

    # ---- backward, attention: softmax, scores, rotary, projections; S tokens
    # u . xn_j with xn = w * xr1 (the input norm's output, freed above)
    grad_probs = ((u * layer.input_layernorm.weight).float() @ xr1.transpose(1, 2)).to(u.dtype)  # (B, H*K, S)
    centre = (u * mixed).sum(-1, keepdim=True)  # sum_j p_j dL/dp_j per row
    grad_scores = probs * (grad_probs - centre)  # d(loss)/d(q.k), without the scale
    grad_scores = grad_scores.view(b, n_kv, groups * k_count, s)
    grad_k = grad_scores.transpose(2, 3) @ q_groups  # (B, N, S, d)
    grad_k = _rope_backward(grad_k, cos.unsqueeze(1), sin.unsqueeze(1)).transpose(1, 2)  # (B, S, N, d)
    if qk_norms:
        grad_k = _rms_backward(attn.k_norm, grad_k.contiguous(), kxr, kr)
    grad_k = grad_k.reshape(b * s, -1)
    grad_q = (grad_scores @ k.transpose(1, 2)).view(b, n_kv, groups, k_count, hd).permute(0, 3, 1, 2, 4)
    grad_q = _rope_backward(grad_q.reshape(b, k_count, n_q, hd), cos_q.unsqueeze(2), sin_q.unsqueeze(2))
    if qk_norms:
        grad_q = _rms_backward(attn.q_norm, grad_q, qxr, qr)
    del grad_scores, grad_probs
    # beta=0: the first argument only gives the output's shape (x's values are not read)
    grad_xn = torch.addmm(x.reshape(b * s, dim), grad_k, attn.k_proj.weight, beta=0, alpha=scale).view(b, s, dim)
    grad_xn.baddbmm_(probs.transpose(1, 2), u)  # the value path
    grad_xq = torch.addmm(h.view(b * k_count, dim), grad_q.reshape(b * k_count, -1), attn.q_proj.weight,
                          beta=0, alpha=scale)
    index = qpos.unsqueeze(-1).expand(b, k_count, dim)
    grad_xn.scatter_add_(1, index, grad_xq.view(b, k_count, dim))
    grad_x = _rms_backward(layer.input_layernorm, grad_xn, xr1, r1)
    grad_x.scatter_add_(1, index, grad_h)  # the residual at the proxy positions
    return torch.linalg.vector_norm(grad_x, dim=-1, dtype=torch.float32)
