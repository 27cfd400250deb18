"""Baseline selectors: valid choices through the same runtime as PIO-FVLM."""

import pytest
import torch

import pio_fvlm
from helpers import n_visual, standard_batch
from pio_fvlm.select.baselines import (
    BASELINES,
    DartSelector,
    FastVSelector,
    PoolingSelector,
    RandomSelector,
    UniformSelector,
)
from tiny_models import tiny_llava

GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[0, 1, 2, 3, 4])


@pytest.fixture(scope="module")
def model():
    return tiny_llava(image_size=112, seed=21)  # 8 x 8 = 64 tokens per image


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("budget", [16, 7])
def test_baseline_keeps_budget_and_decodes_consistently(model, name, budget):
    selector = BASELINES[name](tokens_per_image=64) if name == "pooling" else BASELINES[name]()
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=budget, layer=2, selector=selector)
    try:
        cached = model.generate(**inputs, **GEN)
        sel = pio_fvlm.last_selection(model)
        assert [len(s) for s in sel] == [min(budget, n) for n in n_visual(inputs)]
        for row, s in zip(inputs["input_ids"], sel):
            assert bool((row[s] == 3).all())
        if name != "fastv":  # FastV reads the last token, which moves when recomputing uncached
            uncached = model.generate(**inputs, use_cache=False, **GEN)
            assert torch.equal(cached, uncached)
    finally:
        pio_fvlm.unwrap(model)


def test_uniform_is_evenly_spaced(model):
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=8, selector=UniformSelector())
    with torch.no_grad():
        model(**inputs)
    first = int((inputs["input_ids"][0] == 3).nonzero()[0])
    assert (pio_fvlm.last_selection(model)[0] - first).tolist() == [4, 12, 20, 28, 36, 44, 52, 60]
    pio_fvlm.unwrap(model)


def test_pooling_keeps_tile_centres_with_means(model):
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=4, selector=PoolingSelector(tokens_per_image=64))
    with torch.no_grad():
        model(**inputs)
    first = int((inputs["input_ids"][0] == 3).nonzero()[0])
    # 8 x 8 grid, 2 x 2 tiles of 4 x 4: centres at (2, 2), (2, 6), (6, 2), (6, 6)
    assert (pio_fvlm.last_selection(model)[0] - first).tolist() == [18, 22, 50, 54]
    pio_fvlm.unwrap(model)
    with pytest.raises(ValueError, match="square token grid"):
        PoolingSelector(tokens_per_image=60)


def test_random_is_seeded_and_seeds_differ(model):
    inputs = standard_batch(model)
    picks = []
    for seed in (0, 0, 1):
        pio_fvlm.wrap(model, budget=6, selector=RandomSelector(seed))
        with torch.no_grad():
            model(**inputs)
        picks.append([s.tolist() for s in pio_fvlm.last_selection(model)])
    pio_fvlm.unwrap(model)
    assert picks[0] == picks[1] != picks[2]


def test_fastv_and_dart_differ_from_uniform(model):
    inputs = standard_batch(model)
    out = {}
    for name, sel in (("fastv", FastVSelector()), ("dart", DartSelector()), ("uniform", UniformSelector())):
        pio_fvlm.wrap(model, budget=6, layer=2, selector=sel)
        with torch.no_grad():
            model(**inputs)
        out[name] = [s.tolist() for s in pio_fvlm.last_selection(model)]
    pio_fvlm.unwrap(model)
    assert out["fastv"] != out["uniform"] and out["dart"] != out["uniform"]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl", "internvl"])
def test_attention_rows_equal_the_layers_own_attention_weights(family):
    """What FastV ranks by, recomputed from the layer's projections, equals the eager layer's own
    attention weights (rotary, grouped heads, Qwen's biases, Qwen3's q/k norms)."""
    from pio_fvlm.select.baselines import attention_rows
    from tiny_models import Prompt, make_batch, tiny_vlm

    model = tiny_vlm(family, attn_implementation="eager", seed=9)
    batch = make_batch(model, [Prompt([5, 6], [9, 10, 11, 12], size=1)])
    layer = model.model.language_model.layers[1]
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["position_embeddings"] = kwargs["position_embeddings"]

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        weights = model(**batch, output_attentions=True).attentions[1]  # (1, H, S, S)
        handle.remove()
        s = weights.shape[-1]
        rows = torch.tensor([[s - 1, s - 3]])
        allowed = torch.arange(s)[None, None, :] <= rows[..., None]
        got = attention_rows(layer.self_attn, layer.input_layernorm(seen["x"]), seen["position_embeddings"], rows,
                             allowed)
    torch.testing.assert_close(got[0], weights[0][:, [s - 1, s - 3]].float(), atol=1e-6, rtol=1e-5)
