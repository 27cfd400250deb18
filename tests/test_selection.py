"""The library's probe and selection equal the naive implementation of the method (tests/reference.py)."""

import pytest
import torch

import pio_fvlm
from helpers import standard_batch, standard_prompts
from pio_fvlm.select.saliency import (
    ProbeInputs,
    ProbeModules,
    fast_saliency,
    full_layer_saliency,
    proxy_query_positions,
    supports_fast_probe,
)
from reference import naive_saliency, naive_selection
from tiny_models import FAMILIES, Prompt, make_batch, tiny_llava, tiny_vlm


def _probe_inputs(model, inputs, layer_index, k=4, include_last=False):
    lm = model.model.language_model
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        captured["kwargs"] = dict(kwargs)

    handle = lm.layers[layer_index].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    handle.remove()
    valid = inputs["attention_mask"].bool()
    kwargs = captured["kwargs"]
    inp = ProbeInputs(
        hidden=captured["hidden"],
        valid=valid,
        query_positions=proxy_query_positions(valid, k, include_last),
        layer_kwargs=kwargs,
        position_embeddings=kwargs["position_embeddings"],
    )
    return inp, ProbeModules(lm.layers[layer_index], lm.norm, model.lm_head)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("include_last", [False, True])
def test_fast_probe_equals_full_probe_and_naive(llava_sdpa, padding_side, include_last):
    prompts = [Prompt(before=[5, 6], after=[9, 10, 11, 12, 13]), Prompt(before=[5, 6, 20, 21, 22], after=[9, 10])]
    inputs = make_batch(llava_sdpa, prompts, padding_side=padding_side)
    inp, mods = _probe_inputs(llava_sdpa, inputs, 1, include_last=include_last)
    assert supports_fast_probe(mods.layer)
    fast = fast_saliency(mods, inp)
    full = full_layer_saliency(mods, inp)
    naive, _ = naive_saliency(llava_sdpa, inputs, 1, include_last=include_last)
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(fast[valid], full[valid], rtol=1e-4, atol=1e-7)
    assert torch.allclose(full[valid], naive[valid], rtol=1e-4, atol=1e-7)
    assert (fast[valid] > 0).any()



class _WrappedLinear(torch.nn.Module):
    """A value projection that is not a plain ``nn.Linear`` (as a quantised or LoRA layer is)."""

    def __init__(self, inner: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_fast_probe_with_an_opaque_value_projection(family):
    """The fast probe projects attention-weighted inputs through ``v_proj.weight`` when it is a
    plain Linear; any other module is called on the tokens instead. Both equal the full layer
    (GQA and Qwen's biases included)."""
    model = tiny_vlm(family, attn_implementation="sdpa", seed=2)
    inputs = standard_batch(model)
    inp, mods = _probe_inputs(model, inputs, 1)
    by_weight = fast_saliency(mods, inp)
    attn = mods.layer.self_attn
    attn.v_proj = _WrappedLinear(attn.v_proj)
    opaque = fast_saliency(mods, inp)
    full = full_layer_saliency(mods, inp)
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(opaque[valid], full[valid], rtol=1e-4, atol=1e-7)
    assert torch.allclose(by_weight[valid], full[valid], rtol=1e-4, atol=1e-7)

def test_proxy_positions_follow_the_authors():
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10]).bool()
    assert proxy_query_positions(valid, 4, False).tolist() == [[5, 6, 7, 8]] * 2  # L-5 .. L-2
    assert proxy_query_positions(valid, 4, True).tolist() == [[6, 7, 8, 9]] * 2
    right = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]]).bool()
    assert proxy_query_positions(right, 4, False).tolist() == [[1, 2, 3, 4]]


def test_probe_leaves_no_weight_grads_and_works_in_inference_mode(llava_sdpa):
    inputs = standard_batch(llava_sdpa)
    inp, mods = _probe_inputs(llava_sdpa, inputs, 1)
    with torch.inference_mode():
        hidden = inp.hidden.clone()
        inp.hidden = hidden
        s1 = fast_saliency(mods, inp)
        s2 = full_layer_saliency(mods, inp)
    assert torch.allclose(s1, s2, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in llava_sdpa.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [4, 0.25])
@pytest.mark.parametrize("layer", [1, 2])
def test_wrapped_selection_equals_naive_method(family, layer, budget):
    model = tiny_vlm(family, attn_implementation="sdpa", seed=1)
    inputs = standard_batch(model)
    want = naive_selection(model, inputs, layer, budget)
    pio_fvlm.wrap(model, budget=budget, layer=layer)
    with torch.no_grad():
        model(**inputs)
    got = pio_fvlm.last_selection(model)
    assert [g.tolist() for g in got] == want


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_a_proxy_window_ending_at_the_last_token_equals_naive(family, padded):
    """proxy_includes_last=True, with padding (positions built on the device) and without (on the host)."""
    model = tiny_vlm(family, attn_implementation="sdpa", seed=1)
    prompts = standard_prompts(model) if padded else [Prompt(before=[5, 6], after=[9, 10, 11, 12, 13], images=2)]
    inputs = make_batch(model, prompts)
    assert bool(inputs["attention_mask"].all()) != padded
    want = naive_selection(model, inputs, 1, 3, include_last=True)
    pio_fvlm.wrap(model, budget=3, proxy_includes_last=True)
    with torch.no_grad():
        model(**inputs)
    assert [g.tolist() for g in pio_fvlm.last_selection(model)] == want


def test_selection_at_llava15_token_count():
    """576 visual tokens per image as LLaVA-1.5 (336 px, patch 14), budget 64."""
    model = tiny_llava(image_size=336, patch_size=14, attn_implementation="sdpa", seed=2)
    inputs = make_batch(model, [Prompt(before=[5, 6, 7], after=[9, 10, 11, 12, 13, 14])])
    assert int((inputs["input_ids"] == 3).sum()) == 576
    want = naive_selection(model, inputs, 1, 64)
    pio_fvlm.wrap(model, budget=64)
    with torch.no_grad():
        out = model(**inputs)
    got = pio_fvlm.last_selection(model)
    assert [g.tolist() for g in got] == want
    assert len(got[0]) == 64
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]


def test_nms_off_is_topk_by_saliency(llava_sdpa):
    inputs = standard_batch(llava_sdpa)
    want = naive_selection(llava_sdpa, inputs, 1, 5, threshold=None)
    pio_fvlm.wrap(llava_sdpa, budget=5, nms_threshold=None)
    try:
        with torch.no_grad():
            llava_sdpa(**inputs)
        assert [g.tolist() for g in pio_fvlm.last_selection(llava_sdpa)] == want
    finally:
        pio_fvlm.unwrap(llava_sdpa)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_shortest_row_just_fits_the_proxy_window_and_a_shorter_one_is_refused(family):
    """A left-padded row with exactly K + 1 tokens next to a long one: the selection equals the
    naive method and each row equals itself alone; one token fewer is a clear error, not a silent
    change of the proxy loss."""
    from helpers import assert_batch_equals_alone

    model = tiny_vlm(family, attn_implementation="sdpa", seed=8)
    prompts = [Prompt(before=[], after=[9]), Prompt(before=[5, 6, 7, 8], after=[9, 10, 11, 12, 13, 14], size=1)]
    inputs = make_batch(model, prompts)
    k = int(inputs["attention_mask"][0].sum()) - 1  # the short row's K + 1 tokens exactly
    want = naive_selection(model, inputs, 1, 2, k=k)
    pio_fvlm.wrap(model, budget=2, proxy_tokens=k)
    with torch.no_grad():
        model(**inputs)
    assert [g.tolist() for g in pio_fvlm.last_selection(model)] == want
    assert_batch_equals_alone(model, prompts, inputs)
    pio_fvlm.wrap(model, budget=2, proxy_tokens=k + 1)
    with pytest.raises(ValueError, match=f"too short for proxy_tokens={k + 1}.*proxy_tokens <= {k}"):
        model(**inputs)
    pio_fvlm.wrap(model, budget=2, proxy_tokens=k + 2, proxy_includes_last=True)  # the window may end at the last
    with pytest.raises(ValueError, match=f"too short for proxy_tokens={k + 2}.*proxy_tokens <= {k + 1} "):
        model(**inputs)
    with torch.no_grad():  # the failed call left nothing behind
        pio_fvlm.wrap(model, budget=2, proxy_tokens=k)
        model(**inputs)
    assert [g.tolist() for g in pio_fvlm.last_selection(model)] == want
