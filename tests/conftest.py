"""Fixtures: tiny random models of every family (the helpers the tests share are in helpers.py)."""

from __future__ import annotations

import pytest
import torch

from pio_fvlm.testing import FAMILIES, tiny_llava, tiny_vlm

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llava_sdpa():
    return tiny_llava(attn_implementation="sdpa")


@pytest.fixture(scope="session")
def llava_eager():
    return tiny_llava(attn_implementation="eager")


@pytest.fixture(params=[(f, a) for f in FAMILIES for a in ("sdpa", "eager")], ids=lambda p: f"{p[0]}-{p[1]}")
def any_model(request):
    family, attn = request.param
    return tiny_vlm(family, attn_implementation=attn, seed=3)
