"""generate / KV cache / batching / padding / identity invariants of the runtime."""

import pytest
import torch

import pio_fvlm
from helpers import FixedSelector, layer_lengths, n_visual, standard_batch, standard_prompts, with_cache
from tiny_models import Prompt, make_batch, split_batch, tiny_vlm


def _gen(model, inputs, **kw):
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("do_sample", False)
    # random models may emit special ids; an image id in the output would break the next step
    kw.setdefault("suppress_tokens", [0, 1, 2, 3, 4])
    return model.generate(**inputs, **kw, return_dict_in_generate=True, output_logits=True)


@pytest.fixture
def model(any_model):
    return any_model


def _position_modes(model):
    return ("keep", "compact") if model.config.model_type.startswith("llava") else ("keep",)


@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_cached_decoding_equals_uncached_recompute(model, mode):
    """With the same kept set, decoding through the short KV cache equals recomputing the whole
    pruned sequence at every step without a cache."""
    inputs = standard_batch(model)
    kw = {"greedy": {}, "beam": {"num_beams": 3}, "sample": {"do_sample": True, "top_k": 5}}[mode]
    for positions in _position_modes(model):
        pio_fvlm.wrap(model, budget=3, layer=2, positions=positions, selector=FixedSelector())
        torch.manual_seed(0)
        cached = _gen(model, inputs, **kw)
        torch.manual_seed(0)
        uncached = _gen(model, inputs, use_cache=False, **kw)
        assert torch.equal(cached.sequences, uncached.sequences), positions
        for a, b in zip(cached.logits, uncached.logits):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), positions


def test_pruning_changes_the_computation(model):
    """Guard against a runtime that silently prunes nothing."""
    inputs = standard_batch(model)
    with torch.no_grad():
        full = model(**inputs).logits
    pio_fvlm.wrap(model, budget=3)
    with torch.no_grad():
        pruned = model(**inputs).logits
    last = inputs["attention_mask"].shape[1] - 1
    assert not torch.allclose(full[:, last], pruned[:, last], atol=1e-4)
    assert [len(s) for s in pio_fvlm.last_selection(model)] == [3] * inputs["input_ids"].shape[0]


def test_pruned_layers_see_short_sequences_and_cache(model):
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=4, layer=2)
    with layer_lengths(model) as seen:
        out = model(**inputs, use_cache=True)
    length = inputs["input_ids"].shape[1]
    # each row keeps its text (padding included) and min(n, 4) visual tokens; rows are
    # re-padded to the longest
    short = max(length - n + min(n, 4) for n in n_visual(inputs))
    assert seen[0] == seen[1] == length
    assert seen[2] == seen[3] == short
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache.get_seq_length(0) == length
    assert cache.get_seq_length(2) == short


def test_full_budget_is_bit_identical(model):
    inputs = standard_batch(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_gen = _gen(model, inputs)
    counts = n_visual(inputs)
    for budget in (max(counts), 1000, 1.0):
        pio_fvlm.wrap(model, budget=budget)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(_gen(model, inputs).sequences, ref_gen.sequences)
        assert [len(s) for s in pio_fvlm.last_selection(model)] == counts
    pio_fvlm.unwrap(model)


def test_text_only_prompt_is_untouched(model):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    pio_fvlm.wrap(model, budget=2)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    assert pio_fvlm.last_selection(model) is None


def test_unwrap_restores_bit_identical(model):
    inputs = standard_batch(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_gen = _gen(model, inputs).sequences

    def hooks():
        return [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in model.modules()]

    before = hooks()
    pio_fvlm.wrap(model, budget=3)
    assert hooks() != before
    _gen(model, inputs)
    pio_fvlm.unwrap(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(_gen(model, inputs).sequences, ref_gen)
    assert not pio_fvlm.is_wrapped(model) and not [name for name in vars(model) if "pio_fvlm" in name]
    assert hooks() == before


def test_batch_equals_samples_alone(model):
    """Mixed text lengths, visual counts (where the family allows), two images, video (Qwen)."""
    size = 2 if model.config.model_type != "llava" else 0
    prompts = standard_prompts(model) + [Prompt(before=[5], after=[9, 10, 11], images=2, size=size)]
    batch = make_batch(model, prompts, seed=4)
    length = batch["input_ids"].shape[1]
    for positions in _position_modes(model):
        pio_fvlm.wrap(model, budget=6, positions=positions)
        out = _gen(model, batch)
        sel = pio_fvlm.last_selection(model)
        for i in range(len(prompts)):
            alone = split_batch(model, prompts, batch, i)
            solo = _gen(model, alone)
            n_alone = alone["input_ids"].shape[1]
            assert (sel[i] - (length - n_alone)).tolist() == pio_fvlm.last_selection(model)[0].tolist()
            assert out.sequences[i, length:].tolist() == solo.sequences[0, n_alone:].tolist(), (positions, i)
            for a, b in zip(out.logits, solo.logits):
                assert torch.allclose(a[i], b[0], atol=1e-4, rtol=1e-4), (positions, i)


def test_forward_logits_line_up_with_input_ids(model):
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=4)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out.logits).all()


def test_two_images_in_one_prompt(model):
    inputs = make_batch(model, [Prompt(before=[5, 6], after=[9, 10, 11, 12], images=2)])
    pio_fvlm.wrap(model, budget=5)
    _gen(model, inputs)
    (sel,) = pio_fvlm.last_selection(model)
    assert len(sel) == 5  # the budget covers both images together
    assert bool((inputs["input_ids"][0, sel] == 3).all())
    # the kept tokens come from both images here (the pool is shared, the choice is free):
    # at least check both images were candidates by pruning to all-but-one
    n = n_visual(inputs)[0]
    pio_fvlm.wrap(model, budget=n - 1)
    _gen(model, inputs)
    assert len(pio_fvlm.last_selection(model)[0]) == n - 1


def test_grad_mode_forward_gives_no_weight_grads(model):
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=4)
    out = model(**inputs)  # grad mode on: the probe must not leak into weights
    assert all(p.grad is None for p in model.parameters())
    out.logits.sum().backward()  # the user's own backward still works through the pruned graph
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(model, context):
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=4)
    with context():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_bf16(family):
    model = tiny_vlm(family, attn_implementation="sdpa", dtype=torch.bfloat16, seed=5)
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=4, selector=FixedSelector())
    cached = _gen(model, inputs)
    uncached = _gen(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    pio_fvlm.wrap(model, budget=4)  # the real probe in bf16
    with torch.inference_mode():
        out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert all(len(s) == 4 for s in pio_fvlm.last_selection(model))


def test_mixed_attention_mask_errors(model):
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=4)
    bad = dict(inputs, attention_mask=inputs["attention_mask"][:, None, None, :].float())
    with pytest.raises(ValueError, match="2-D padding attention_mask"):
        model(**bad)
    for mask in (inputs["attention_mask"][:, None, :], inputs["attention_mask"][0]):  # 3-D and 1-D
        with pytest.raises(ValueError, match=f"got a {mask.dim()}-D mask"):
            model(**dict(inputs, attention_mask=mask))


class FullLayerProbeSelector(pio_fvlm.PioSelector):
    """PIO-FVLM through the generic full-layer probe (what layers without the fast path use)."""

    def __call__(self, request):
        request.probe = "full"
        return super().__call__(request)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_full_layer_probe_path_through_the_runtime(model, context):
    """The generic probe calls the real layer inside the layer's own pre-hook: it must leave the
    layer's real inputs (cache!) alone and choose what the fast probe chooses."""
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=3, layer=2)
    with context():
        fast = _gen(model, inputs)
    fast_sel = [s.tolist() for s in pio_fvlm.last_selection(model)]
    pio_fvlm.wrap(model, budget=3, layer=2, selector=FullLayerProbeSelector())
    with context():
        full = _gen(model, inputs)
    assert [s.tolist() for s in pio_fvlm.last_selection(model)] == fast_sel
    assert torch.equal(full.sequences, fast.sequences)
    for a, b in zip(full.logits, fast.logits):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_a_reused_cache_object_starts_clean():
    """A cache object emptied and filled again by a new prefill (other prompts, other kept sets)
    gives what a fresh cache gives: the pruned record of its first use is dropped."""
    from transformers import DynamicCache

    model = tiny_vlm("llava", seed=12)
    first = make_batch(model, [Prompt([5, 6], [9, 10, 11]), Prompt([5], [9, 10, 11, 12], images=2)], seed=1)
    second = make_batch(model, [Prompt([7, 8, 20], [9, 10]), Prompt([5, 6], [9, 10, 11, 12, 13])], seed=2)
    pio_fvlm.wrap(model, budget=3)
    with torch.no_grad():
        fresh = model(**second, use_cache=True).logits
        reused = DynamicCache(config=model.config.text_config)
        model(**first, **with_cache(model, reused), use_cache=True)
        assert reused.get_seq_length() > 0
        reused.reset()  # emptied, as a serving loop reusing one cache object does
        again = model(**second, **with_cache(model, reused), use_cache=True).logits
        step = {"input_ids": torch.full((2, 1), 9), "attention_mask": torch.cat(
            [second["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)}
        fresh_cache = DynamicCache(config=model.config.text_config)
        model(**second, **with_cache(model, fresh_cache), use_cache=True)
        next_fresh = model(**step, **with_cache(model, fresh_cache), use_cache=True).logits
        next_reused = model(**step, **with_cache(model, reused), use_cache=True).logits
    torch.testing.assert_close(again, fresh)
    torch.testing.assert_close(next_reused, next_fresh)


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_a_continued_chunk_with_padding_equals_each_row_alone(positions):
    """A multi-token call on a pruned cache whose new chunk holds padding (rows with chunks of
    different lengths, left padded within the chunk): each row's real tokens get what that row
    gets alone, so the padding of the chunk is masked out of the pruned layers too."""
    from transformers import DynamicCache

    model = tiny_vlm("llava", seed=13)
    prompts = [Prompt([5, 6], [9, 10, 11]), Prompt([5, 6, 20, 21], [9, 10, 11, 12, 13], images=2)]
    batch = make_batch(model, prompts, seed=3)
    chunk = torch.tensor([[24, 25, 26], [0, 27, 28]])
    chunk_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])

    def positions_of(mask):  # positions count real tokens only, as generate numbers them
        return (mask.cumsum(-1) - 1).clamp(min=0)

    pio_fvlm.wrap(model, budget=3, positions=positions)
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        model(**batch, position_ids=positions_of(batch["attention_mask"]), **with_cache(model, cache), use_cache=True)
        full_mask = torch.cat([batch["attention_mask"], chunk_mask], 1)
        together = model(input_ids=chunk, attention_mask=full_mask, position_ids=positions_of(full_mask)[:, -3:],
                         **with_cache(model, cache), use_cache=True).logits
        for i in range(2):
            alone = split_batch(model, prompts, batch, i)
            own = chunk[i][chunk_mask[i].bool()].unsqueeze(0)
            cache = DynamicCache(config=model.config.text_config)
            model(**alone, position_ids=positions_of(alone["attention_mask"]), **with_cache(model, cache),
                  use_cache=True)
            mask = torch.cat([alone["attention_mask"], torch.ones_like(own)], 1)
            solo = model(input_ids=own, attention_mask=mask, position_ids=positions_of(mask)[:, -own.shape[1]:],
                         **with_cache(model, cache), use_cache=True).logits
            torch.testing.assert_close(together[i][chunk_mask[i].bool()], solo[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("same_length", [False, True], ids=["filler", "no-filler"])
def test_every_real_position_of_a_pruned_forward_equals_the_row_alone(same_length):
    """Logits at every real position, the first one included, equal the row run alone: rows that
    keep different lengths (left padding, filler slots in the pruned layers) and rows of one
    length without padding (one scatter back to full length)."""
    model = tiny_vlm("llava", seed=14)
    if same_length:
        prompts = [Prompt([5, 6], [9, 10, 11]), Prompt([7, 8], [12, 13, 14])]
    else:
        prompts = [Prompt([5, 6], [9, 10, 11]), Prompt([5, 6, 20, 21], [9, 10, 11, 12, 13], images=2)]
    batch = make_batch(model, prompts, seed=4)
    assert bool(batch["attention_mask"].all()) == same_length

    def positions_of(mask):
        return (mask.cumsum(-1) - 1).clamp(min=0)

    pio_fvlm.wrap(model, budget=3)
    with torch.no_grad():
        together = model(**batch, position_ids=positions_of(batch["attention_mask"])).logits
        for i in range(2):
            alone = split_batch(model, prompts, batch, i)
            solo = model(**alone, position_ids=positions_of(alone["attention_mask"])).logits[0]
            torch.testing.assert_close(together[i][batch["attention_mask"][i].bool()], solo, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_causal_padding_mask_has_the_format_of_the_models_backend(impl):
    """The mask built for the pruned layers: for SDPA without padding no tensor (its causal
    kernel), with padding a 4-D bool mask; for eager a 4-D additive float mask either way."""
    from pio_fvlm.runtime.masks import causal_padding_mask, check_attention_backend

    config = tiny_vlm("llava", attn_implementation=impl).config.text_config
    assert check_attention_backend(config) == impl
    padding = torch.tensor([[False, True, True], [True, True, True]])
    plain = causal_padding_mask(config, None, 2, 3, 3, torch.float32, torch.device("cpu"))
    padded = causal_padding_mask(config, padding, 2, 3, 3, torch.float32, torch.device("cpu"))
    if impl == "sdpa":
        assert plain is None and padded.dtype == torch.bool and padded.shape == (2, 1, 3, 3)
        assert padded[0, 0, 2].tolist() == [False, True, True] and padded[1, 0, 0].tolist() == [True, False, False]
    else:
        assert plain.dtype == padded.dtype == torch.float32 and padded.shape == (2, 1, 3, 3)
        assert (padded[0, 0, 2, 0] < -1e30) and padded[0, 0, 2, 1:].eq(0).all()
