"""Shared fixtures and helpers: tiny random LLaVA models, a fixed-set selector, a naive reference."""

from __future__ import annotations

import pytest
import torch

from pio_fvlm.select import SelectionRequest, select_with_nms
from pio_fvlm.testing import Prompt, make_batch, tiny_llava

torch.set_num_threads(2)


class FixedSelector:
    """Keeps the same visual tokens whatever the hidden states: by their rank among the row's
    visual tokens (a scrambled but deterministic order). Used to compare cached decoding with
    an uncached recompute on the same kept set."""

    calls = 0

    def __call__(self, request: SelectionRequest) -> torch.Tensor:
        FixedSelector.calls += 1
        cand = request.candidates
        rank = cand.long().cumsum(1) - 1
        score = ((rank * 7919) % 1009).float()
        return select_with_nms(score, request.probe_inputs.hidden, cand, request.budgets, None)


@pytest.fixture(scope="session")
def llava_sdpa():
    return tiny_llava(attn_implementation="sdpa")


@pytest.fixture(scope="session")
def llava_eager():
    return tiny_llava(attn_implementation="eager")


def standard_batch(model, seed: int = 0):
    """Two prompts of different text lengths, left padded."""
    prompts = [Prompt(before=[5, 6], after=[9, 10, 11, 12, 13]), Prompt(before=[5, 6, 20, 21, 22], after=[9, 10, 14])]
    return make_batch(model, prompts, seed=seed)


def logits_equal_on_valid(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5) -> bool:
    m = mask.bool()
    return torch.allclose(a[m], b[m], atol=atol, rtol=1e-4)
