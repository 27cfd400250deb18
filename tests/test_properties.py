"""Property-based: random layouts keep the core invariants (hypothesis)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pio_fvlm
from helpers import FixedSelector, n_visual
from tiny_models import Prompt, make_batch, split_batch, tiny_llava

MODEL = tiny_llava(image_size=56, seed=31)  # 16 visual tokens per image
GEN = dict(max_new_tokens=3, do_sample=False, suppress_tokens=[0, 1, 2, 3, 4])
text = st.lists(st.integers(5, 100), min_size=0, max_size=6)


@st.composite
def prompt(draw):
    """Image at the start (no text before), in the middle, or at the end (a short tail)."""
    before = draw(text)
    after = draw(st.lists(st.integers(5, 100), min_size=1, max_size=6))
    return Prompt(before=before, after=after, images=draw(st.integers(1, 3)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=st.lists(prompt(), min_size=1, max_size=4), budget=st.integers(1, 50), layer=st.integers(1, 3))
def test_left_padded_generate(prompts, budget, layer):
    batch = make_batch(MODEL, prompts, seed=1)
    pio_fvlm.wrap(MODEL, budget=budget, layer=layer, selector=FixedSelector())
    try:
        cached = MODEL.generate(**batch, **GEN)
        kept = pio_fvlm.last_selection(MODEL)
        assert [len(k) for k in kept] == [min(budget, n) for n in n_visual(batch)]
        assert torch.equal(cached, MODEL.generate(**batch, use_cache=False, **GEN))
        length = batch["input_ids"].shape[1]
        for i in range(len(prompts)):
            alone = split_batch(MODEL, prompts, batch, i)
            solo = MODEL.generate(**alone, **GEN)
            assert cached[i, length:].tolist() == solo[0, alone["input_ids"].shape[1]:].tolist()
    finally:
        pio_fvlm.unwrap(MODEL)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=st.lists(prompt(), min_size=1, max_size=4), budget=st.integers(1, 50))
def test_right_padded_forward(prompts, budget):
    """Right padding (a forward pass, as in scoring): valid positions equal the samples alone."""
    batch = make_batch(MODEL, prompts, seed=2, padding_side="right")
    pio_fvlm.wrap(MODEL, budget=budget)
    try:
        with torch.no_grad():
            logits = MODEL(**batch).logits
            for i in range(len(prompts)):
                alone = split_batch(MODEL, prompts, batch, i, padding_side="right")
                solo = MODEL(**alone).logits[0]
                n = solo.shape[0]
                last = n - 1  # the prediction that matters; pruned positions carry no prediction
                assert torch.allclose(logits[i, last], solo[last], atol=1e-4, rtol=1e-4)
    finally:
        pio_fvlm.unwrap(MODEL)
