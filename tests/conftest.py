"""Fixtures: tiny random models of every family (the helpers the tests share are in helpers.py)."""

from __future__ import annotations

import pytest
import torch

from flash_attn_standin import flash_attention_2_standin, use_flash_attention_2
from helpers import SERVING_BUDGET
from tiny_models import FAMILIES, tiny_llava, tiny_vlm

torch.set_num_threads(2)

# Every registered family, with every attention backend the runtime supports on a CPU
# (FlashAttention-2 through the plain-torch stand-in of flash-attn, tests/flash_attn_standin.py).
INVARIANT_FAMILIES = FAMILIES
BACKENDS = ("sdpa", "eager", "flash_attention_2")


@pytest.fixture(scope="session")
def llava_sdpa():
    return tiny_llava(attn_implementation="sdpa")


@pytest.fixture(scope="session")
def llava_eager():
    return tiny_llava(attn_implementation="eager")


@pytest.fixture(params=[(f, a) for f in INVARIANT_FAMILIES for a in BACKENDS], ids=lambda p: f"{p[0]}-{p[1]}")
def any_model(request):
    family, attn = request.param
    if attn != "flash_attention_2":
        yield tiny_vlm(family, attn_implementation=attn, seed=3)
        return
    with flash_attention_2_standin():
        yield use_flash_attention_2(tiny_vlm(family, attn_implementation="sdpa", seed=3))


@pytest.fixture(scope="module")
def local():
    """The demo model and processor in this process, wrapped as the servers in the serving tests."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pio_fvlm import wrap
    from pio_fvlm.shapes_vlm import ASSET_DIR

    model = wrap(LlavaForConditionalGeneration.from_pretrained(ASSET_DIR).eval(), budget=SERVING_BUDGET)
    return model, AutoProcessor.from_pretrained(ASSET_DIR)
