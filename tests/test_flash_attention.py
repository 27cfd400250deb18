"""FlashAttention-2: transformers' own FA2 code path, run on the plain-torch stand-in of flash-attn
(tests/flash_attn_standin.py). First the stand-in is checked against plain attention and the
unwrapped FA2 model against SDPA; then the method's invariants hold with FA2 on every family (the
runtime's tests also run every family with FA2 through the ``any_model`` fixture)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import pio_fvlm
from conftest import INVARIANT_FAMILIES
from flash_attn_standin import (
    flash_attention_2_standin,
    flash_attn_func,
    flash_attn_varlen_func,
    pad_input,
    unpad_input,
    use_flash_attention_2,
)
from helpers import GREEDY, FixedSelector, assert_batch_equals_alone, standard_batch, standard_prompts
from reference import naive_selection
from tiny_models import Prompt, make_batch, tiny_vlm

ALL_FAMILIES = INVARIANT_FAMILIES


def _plain_attention(q, k, v, causal):
    """(B, Sq, H, D) / (B, Sk, Hkv, D) by SDPA with an explicit bottom-right causal mask."""
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2), v.repeat_interleave(group, 2)
    sq, sk = q.shape[1], k.shape[1]
    mask = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        mask = torch.arange(sk)[None] <= torch.arange(sq)[:, None] + (sk - sq)
    out = F.scaled_dot_product_attention(qt, kt, vt.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2) * mask.any(1).view(1, sq, 1, 1)


@pytest.mark.parametrize("sq, sk", [(7, 7), (3, 9), (1, 6)])
@pytest.mark.parametrize("causal", [True, False])
def test_standin_equals_plain_attention_with_gqa_and_bottom_right_causal(sq, sk, causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, sq, 4, 8), torch.randn(2, sk, 2, 8), torch.randn(2, sk, 2, 8)
    assert torch.allclose(flash_attn_func(q, k, v, causal=causal), _plain_attention(q, k, v, causal), atol=1e-6)


def test_standin_gives_zeros_to_queries_that_see_no_key():
    q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    out = flash_attn_func(q, k, v, causal=True)  # bottom-right: queries 0 and 1 see nothing
    assert torch.equal(out[0, :2], torch.zeros(2, 2, 4))
    assert torch.allclose(out[:, 2:], _plain_attention(q[:, 2:], k, v, True), atol=1e-6)


def test_standin_varlen_equals_each_sequence_alone_and_padding_round_trips():
    torch.manual_seed(1)
    lengths = [3, 6, 1]
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, 6 - n:] = True  # left padding
    q, k, v = torch.randn(3, 6, 4, 8), torch.randn(3, 6, 2, 8), torch.randn(3, 6, 2, 8)
    (q_u, idx, cu, longest, used), (k_u, *_), (v_u, *_) = (unpad_input(x, mask) for x in (q, k, v))
    assert cu.tolist() == [0, 3, 9, 10] and longest == 6 and used.tolist() == lengths
    out = pad_input(flash_attn_varlen_func(q_u, k_u, v_u, cu, cu, longest, longest, causal=True), idx, 3, 6)
    for row, n in enumerate(lengths):
        alone = flash_attn_func(q[row:row + 1, 6 - n:], k[row:row + 1, 6 - n:], v[row:row + 1, 6 - n:], causal=True)
        assert torch.allclose(out[row, 6 - n:], alone[0], atol=1e-6)
        assert torch.equal(out[row, :6 - n], torch.zeros(6 - n, 4, 8))
    assert torch.equal(pad_input(q_u, idx, 3, 6)[mask], q[mask])


def test_standin_refuses_what_it_does_not_compute():
    q = torch.randn(1, 2, 2, 4)
    with pytest.raises(NotImplementedError, match="sliding window"):
        flash_attn_func(q, q, q, window_size=(4, 0))


def _fa2_and_sdpa(family: str, seed: int = 3):
    """The same random weights as an SDPA model and as an FA2 model (with the stand-in active)."""
    return tiny_vlm(family, attn_implementation="sdpa", seed=seed), use_flash_attention_2(
        tiny_vlm(family, attn_implementation="sdpa", seed=seed))


@pytest.fixture
def standin():
    with flash_attention_2_standin():
        yield


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_unwrapped_fa2_model_equals_sdpa_at_batch_1_and_left_padded(family, standin):
    sdpa, fa2 = _fa2_and_sdpa(family)
    assert fa2.config.text_config._attn_implementation == "flash_attention_2"
    batch = standard_batch(sdpa)
    valid = batch["attention_mask"].bool()
    assert not valid.all()  # left padded
    assert torch.allclose(_logits(fa2, batch)[valid], _logits(sdpa, batch)[valid], atol=1e-4, rtol=1e-4)
    alone = make_batch(sdpa, standard_prompts(sdpa)[:1])
    assert torch.allclose(_logits(fa2, alone), _logits(sdpa, alone), atol=1e-4, rtol=1e-4)


def test_the_fa2_path_really_runs_the_standin(standin, monkeypatch):
    calls = _count_flash_calls(monkeypatch)
    from transformers import modeling_flash_attention_utils as utils

    monkeypatch.setattr(utils, "_loaded_implementation", None)
    _, fa2 = _fa2_and_sdpa("llava")
    _logits(fa2, standard_batch(fa2))  # left padded: the unpadded (varlen) path
    _logits(fa2, make_batch(fa2, standard_prompts(fa2)[:1]))  # no padding: the batch-major path
    assert "flash_attn_varlen_func" in calls and "flash_attn_func" in calls


def _count_flash_calls(monkeypatch) -> list[str]:
    """The names of the stand-in's functions, one per call, from now on."""
    import flash_attn

    calls: list[str] = []

    def counted(name):
        original = getattr(flash_attn, name)

        @functools.wraps(original)  # transformers reads the signature for the keywords it passes
        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return call

    for name in ("flash_attn_func", "flash_attn_varlen_func"):
        monkeypatch.setattr(flash_attn, name, counted(name))
    from transformers import modeling_flash_attention_utils as utils

    monkeypatch.setattr(utils, "_loaded_implementation", None)
    return calls


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fa2_selection_equals_the_naive_method(family, standin):
    _, model = _fa2_and_sdpa(family, seed=1)
    inputs = standard_batch(model)
    want = naive_selection(model, inputs, 1, 4)
    pio_fvlm.wrap(model, budget=4, layer=1)
    with torch.no_grad():
        model(**inputs)
    assert [g.tolist() for g in pio_fvlm.last_selection(model)] == want


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fa2_pruned_selection_and_logits_equal_sdpa(family, standin):
    sdpa, fa2 = _fa2_and_sdpa(family, seed=2)
    batch = standard_batch(sdpa)
    valid = batch["attention_mask"].bool()
    for model in (sdpa, fa2):
        pio_fvlm.wrap(model, budget=4, layer=2)
    a, b = _logits(sdpa, batch), _logits(fa2, batch)
    assert [s.tolist() for s in pio_fvlm.last_selection(fa2)] == [s.tolist() for s in pio_fvlm.last_selection(sdpa)]
    assert torch.allclose(a[valid], b[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fa2_batch_1_with_kept_positions_is_not_read_as_packed_sequences(family, standin):
    """At batch 1 without padding the pruned layers get no mask and position ids with gaps
    (``positions="keep"``), which transformers' FA2 code inspects for packed sequences."""
    sdpa, fa2 = _fa2_and_sdpa(family, seed=4)
    alone = make_batch(sdpa, [Prompt(before=[5, 6, 7], after=[9, 10, 11, 12], size=0)])
    for model in (sdpa, fa2):
        pio_fvlm.wrap(model, budget=3, layer=1, positions="keep")
    assert torch.allclose(_logits(fa2, alone), _logits(sdpa, alone), atol=1e-4, rtol=1e-4)
    out_sdpa = sdpa.generate(**alone, **GREEDY)
    assert torch.equal(fa2.generate(**alone, **GREEDY), out_sdpa)


def test_fa2_pruned_layers_at_batch_1_take_the_batch_major_path(standin, monkeypatch):
    """The pruned layers get no position ids under FlashAttention (their rotary comes with the
    position embeddings), so transformers does not read the gaps as packing: no varlen call and
    no host read per layer."""
    _, fa2 = _fa2_and_sdpa("llava", seed=4)
    alone = make_batch(fa2, [Prompt(before=[5, 6, 7], after=[9, 10, 11, 12], size=0)])
    pio_fvlm.wrap(fa2, budget=3, layer=1, positions="keep")
    calls = _count_flash_calls(monkeypatch)
    _logits(fa2, alone)
    layers = len(fa2.model.language_model.layers)
    assert len(calls) > layers and set(calls) == {"flash_attn_func"}  # the vision tower's, then every layer's


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fa2_cached_decode_equals_uncached_and_batch_equals_alone(family, standin):
    _, model = _fa2_and_sdpa(family, seed=5)
    prompts = standard_prompts(model)
    batch = make_batch(model, prompts)
    pio_fvlm.wrap(model, budget=3, layer=2, selector=FixedSelector())
    cached = model.generate(**batch, **GREEDY)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **GREEDY))
    pio_fvlm.wrap(model, budget=3, layer=2)
    assert_batch_equals_alone(model, prompts, batch)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fa2_keep_everything_is_bit_identical(family, standin):
    _, model = _fa2_and_sdpa(family, seed=6)
    batch = standard_batch(model)
    ref = _logits(model, batch)
    pio_fvlm.wrap(model, budget=1.0)
    assert torch.equal(_logits(model, batch), ref)
    pio_fvlm.unwrap(model)
    assert torch.equal(_logits(model, batch), ref)
