"""Attention masks for the shortened sequence, in whatever format the backend expects.

The pruned layers get a fresh mask built by transformers' own mask interface for the model's
attention implementation (4-D bool for SDPA, 4-D additive float for eager, 2-D or ``None``
for FlashAttention), from a 2-D padding mask of the shortened sequence. Filler slots (rows
that kept fewer tokens than the longest row) are marked as padding.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compat import mask_interface

ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function = mask_interface()

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


def check_attention_backend(text_config: Any) -> str:
    """The model's attention implementation, or a ValueError naming the supported ones."""
    impl = getattr(text_config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {impl!r} is not supported by pio_fvlm; load the model with "
            f"attn_implementation= one of {SUPPORTED_ATTENTION}"
        )
    return impl


def causal_padding_mask(
    text_config: Any,
    padding: torch.Tensor | None,
    batch: int,
    q_len: int,
    kv_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Any:
    """A causal mask over ``kv_len`` keys for the last ``q_len`` of them as queries.

    Args:
        padding: (B, kv_len) bool, True where a key is a real token; ``None`` when every key is
            (then SDPA and FlashAttention need no mask tensor at all).
    Returns:
        What the backend's layers expect as ``attention_mask`` (tensor or ``None``).
    """
    impl = check_attention_backend(text_config)
    return ALL_MASK_ATTENTION_FUNCTIONS[impl](
        batch_size=batch,
        q_length=q_len,
        kv_length=kv_len,
        q_offset=kv_len - q_len,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=padding,
        allow_is_causal_skip=True,
        dtype=dtype,
        config=text_config,
        use_vmap=False,
        device=device,
    )
