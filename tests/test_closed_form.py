"""The closed-form probe (no autograd) gives the autograd probes' saliency on every family."""

import pytest
import torch

import pio_fvlm
from helpers import standard_batch
from pio_fvlm.select.closed_form import closed_form_saliency, supports_closed_form
from pio_fvlm.select.saliency import ProbeInputs, ProbeModules, fast_saliency, full_layer_saliency
from test_selection import _probe_inputs
from tiny_models import FAMILIES, Prompt, make_batch, tiny_vlm


def _with_host_positions(inp: ProbeInputs) -> ProbeInputs:
    """The same inputs with the host copy of the proxy positions that the runtime passes."""
    return ProbeInputs(inp.hidden, inp.valid, inp.query_positions, inp.layer_kwargs, inp.position_embeddings,
                       query_positions_host=inp.query_positions.numpy(), all_valid=bool(inp.valid.all()))


# Every family whose layers have the closed form: a mixture of experts routes each token on its
# own and gets the fast probe instead (test_moe_layers_get_the_fast_probe_equal_to_the_full_layer).
CLOSED_FORM_FAMILIES = [f for f in FAMILIES if f != "qwen3_vl_moe"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", CLOSED_FORM_FAMILIES)
def test_closed_form_equals_autograd_probes(family, attn):
    """GQA (2 key/value heads of 4), Qwen's q/k/v biases, M-RoPE, left padding."""
    model = tiny_vlm(family, attn_implementation=attn, seed=4)
    inputs = standard_batch(model)
    inp, mods = _probe_inputs(model, inputs, 1)
    assert supports_closed_form(mods.layer, mods.norm, mods.head)
    closed = closed_form_saliency(mods, inp)
    full = full_layer_saliency(mods, inp)
    valid = inputs["attention_mask"].bool()
    assert not valid.all(), "the batch must hold padding"
    fast = fast_saliency(mods, inp)
    assert torch.allclose(closed[valid], full[valid], rtol=1e-4, atol=1e-7)
    assert torch.allclose(closed[valid], fast[valid], rtol=1e-4, atol=1e-7)
    assert (closed[valid] > 0).float().mean() > 0.9  # all but the tokens after the proxy positions


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_moe_layers_get_the_fast_probe_equal_to_the_full_layer(attn):
    """Qwen3-VL-MoE: no closed form (routed experts), the fast probe runs the experts at the proxy
    positions only (each token is routed on its own) and equals the full-layer probe."""
    model = tiny_vlm("qwen3_vl_moe", attn_implementation=attn, seed=4)
    inputs = standard_batch(model)
    inp, mods = _probe_inputs(model, inputs, 1)
    assert not supports_closed_form(mods.layer, mods.norm, mods.head)
    valid = inputs["attention_mask"].bool()
    fast, full = fast_saliency(mods, inp), full_layer_saliency(mods, inp)
    assert torch.allclose(fast[valid], full[valid], rtol=1e-4, atol=1e-7)
    pio_fvlm.wrap(model, budget=3)
    assert pio_fvlm.describe(model).probes == ("fast",)
    dense = tiny_vlm("qwen3_vl", seed=4)
    pio_fvlm.wrap(dense, budget=3)
    assert pio_fvlm.describe(dense).probes == ("closed_form",)


@pytest.mark.parametrize("include_last", [False, True])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_closed_form_with_host_built_key_mask(family, include_last):
    """Without padding the runtime hands over host positions and the key mask is built on the
    host; with them or without, the result is the same."""
    model = tiny_vlm(family, attn_implementation="sdpa", seed=5)
    inputs = make_batch(model, [Prompt(before=[5, 6, 20], after=[9, 10, 11, 12, 13, 14])])
    inp, mods = _probe_inputs(model, inputs, 1, include_last=include_last)
    host = _with_host_positions(inp)
    assert host.all_valid
    device_mask = closed_form_saliency(mods, inp)
    host_mask = closed_form_saliency(mods, host)
    assert torch.equal(device_mask, host_mask)
    assert torch.allclose(host_mask, full_layer_saliency(mods, inp), rtol=1e-4, atol=1e-7)


def test_closed_form_with_proxy_positions_clamped_to_a_short_row():
    """A left-padded row with fewer real tokens than K + 1: proxy positions repeat (clamped to the
    first real token), and their gradients must add up as autograd's do."""
    model = tiny_vlm("llava", attn_implementation="sdpa", seed=6)
    inputs = standard_batch(model)
    inp, mods = _probe_inputs(model, inputs, 1, k=40)  # more proxy positions than real tokens
    assert (inp.query_positions[:, :1] == inp.query_positions[:, 1:2]).any()
    closed = closed_form_saliency(mods, inp)
    full = full_layer_saliency(mods, inp)
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(closed[valid], full[valid], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_closed_form_in_bfloat16_and_inference_mode(family):
    model = tiny_vlm(family, attn_implementation="sdpa", seed=7, dtype=torch.bfloat16)
    inputs = standard_batch(model)
    inp, mods = _probe_inputs(model, inputs, 1)
    with torch.inference_mode():
        inp.hidden = inp.hidden.clone()
        closed = closed_form_saliency(mods, inp)
        fast = fast_saliency(mods, inp)
    valid = inputs["attention_mask"].bool()
    assert closed.dtype == torch.float32
    # bf16 keeps ~3 significant digits; both compute the same products in the same precision
    assert torch.allclose(closed[valid], fast[valid], rtol=0.05, atol=1e-3)
    assert torch.corrcoef(torch.stack([closed[valid], fast[valid]]))[0, 1] > 0.999
    assert all(p.grad is None for p in model.parameters())


def test_closed_form_is_refused_for_other_layers():
    """A layer whose MLP is not a gated SiLU, or a norm that is not HF's RMSNorm, is not claimed."""
    model = tiny_vlm("llava", seed=0)
    lm = model.model.language_model
    layer = lm.layers[1]
    assert supports_closed_form(layer, lm.norm, model.lm_head)
    layer.mlp.act_fn = torch.nn.GELU()
    assert not supports_closed_form(layer, lm.norm, model.lm_head)
    layer = lm.layers[2]
    assert not supports_closed_form(layer, torch.nn.LayerNorm(64), model.lm_head)
    layer.self_attn.q_norm = torch.nn.Identity()  # a Qwen3-style q/k norm is not handled here
    assert not supports_closed_form(layer, lm.norm, model.lm_head)
    mods = ProbeModules(lm.layers[3], lm.norm, model.lm_head)
    assert supports_closed_form(mods.layer, mods.norm, mods.head)


def test_only_an_rms_norm_is_taken_for_one():
    """The closed form writes the RMSNorm out; a norm that has its attributes but computes
    something else (here: a LayerNorm-like centring) must send the layer to the autograd probes."""
    model = tiny_vlm("llava", num_layers=2, seed=4)
    layer, norm, head = model.model.language_model.layers[1], model.model.language_model.norm, model.lm_head
    assert supports_closed_form(layer, norm, head)

    class CentredNorm(torch.nn.Module):
        def __init__(self, like):
            super().__init__()
            self.weight, self.variance_epsilon = like.weight, like.variance_epsilon

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    assert not supports_closed_form(layer, CentredNorm(norm), head)
    original = layer.input_layernorm
    layer.input_layernorm = CentredNorm(original)
    try:
        assert not supports_closed_form(layer, norm, head)
    finally:
        layer.input_layernorm = original
