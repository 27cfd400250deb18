"""Qwen3-VL: DeepStack injections after decoder layers 0-2 land on each row's own kept tokens."""

import pytest
import torch

import pio_fvlm
from helpers import FixedSelector
from tiny_models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, Prompt, make_batch, tiny_vlm

# different visual counts and kept sets per row, left padding, images and a video (frames as separate runs)
PROMPTS = [
    Prompt(before=[5, 7], after=[9, 10, 11, 12, 13], size=0),
    Prompt(before=[5, 7, 20, 21, 22], after=[9, 10, 14], images=2, size=2),
    Prompt(before=[5, 30], after=[9, 10, 11], images=1, size=1, videos=1),
]


def masked_reference(model, batch, kept: list[torch.Tensor], layer: int) -> torch.Tensor:
    """Logits of the unwrapped model when layers from ``layer`` on cannot attend to the dropped
    visual tokens (eager attention, a 4-D additive mask): the same attention sets as pruning with
    the kept tokens' own positions, with transformers' own DeepStack on the full sequence."""
    ids = batch["input_ids"]
    dropped = (ids == IMAGE_TOKEN_ID) | (ids == VIDEO_TOKEN_ID)
    for row, keep in enumerate(kept):
        dropped[row, keep] = False

    def hide(module, args, kwargs):
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.masked_fill(dropped[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    layers = model.model.language_model.layers
    handles = [layers[i].register_forward_pre_hook(hide, with_kwargs=True) for i in range(layer, len(layers))]
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family, layer", [("qwen3_vl", 1), ("qwen3_vl", 2), ("qwen3_vl", 3), ("qwen3_vl_moe", 1)])
def test_deepstack_rows_follow_each_rows_kept_tokens(family, layer):
    model = tiny_vlm(family, attn_implementation="eager", seed=5)
    batch = make_batch(model, PROMPTS)
    pio_fvlm.wrap(model, budget=3, layer=layer)
    with torch.no_grad():
        pruned = model(**batch).logits
    kept = pio_fvlm.last_selection(model)
    pio_fvlm.unwrap(model)
    assert len({tuple(k.tolist()) for k in kept}) == 3  # every row keeps its own set
    reference = masked_reference(model, batch, kept, layer)
    ids = batch["input_ids"]
    text = (batch["attention_mask"] == 1) & (ids != IMAGE_TOKEN_ID) & (ids != VIDEO_TOKEN_ID)
    torch.testing.assert_close(pruned[text], reference[text], atol=1e-5, rtol=1e-4)
    for row, keep in enumerate(kept):  # the kept visual tokens' outputs too
        torch.testing.assert_close(pruned[row, keep], reference[row, keep], atol=1e-5, rtol=1e-4)


def test_without_the_injection_on_kept_tokens_the_outputs_differ():
    """The check above can fail: skipping DeepStack on the pruned layers changes the text's logits."""
    model = tiny_vlm("qwen3_vl", attn_implementation="eager", seed=5)
    batch = make_batch(model, PROMPTS)
    pio_fvlm.wrap(model, budget=3, layer=1)
    language_model = model.model.language_model
    language_model.__dict__["_deepstack_process"] = lambda hidden, mask, embeds: (
        hidden if hidden.shape[1] != mask.shape[1] else type(language_model)._deepstack_process(
            language_model, hidden, mask, embeds))
    with torch.no_grad():
        skipped = model(**batch).logits
    kept = pio_fvlm.last_selection(model)
    pio_fvlm.unwrap(model)
    del language_model.__dict__["_deepstack_process"]
    reference = masked_reference(model, batch, kept, 1)
    last = batch["attention_mask"].shape[1] - 1
    assert not torch.allclose(skipped[:, last], reference[:, last], atol=1e-4)


def test_unwrap_removes_the_stand_in_and_a_copy_carries_it():
    import copy

    model = tiny_vlm("qwen3_vl", seed=6)
    batch = make_batch(model, PROMPTS[:2])
    with torch.no_grad():
        before = model(**batch).logits
    pio_fvlm.wrap(model, budget=3, selector=FixedSelector())
    assert "_deepstack_process" in model.model.language_model.__dict__
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(**batch).logits, model(**batch).logits)
    assert twin.model.language_model.__dict__["_deepstack_process"].runtime is not (
        model.model.language_model.__dict__["_deepstack_process"].runtime)
    pio_fvlm.unwrap(model)
    assert "_deepstack_process" not in model.model.language_model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_moe_variant_keeps_the_invariants():
    """Qwen3-VL-MoE (experts routed per token): the selection equals the naive reference, a padded
    batch equals each sample alone, cached decoding equals an uncached recompute."""
    from helpers import assert_cached_equals_uncached_and_batch_equals_alone
    from reference import naive_selection

    model = tiny_vlm("qwen3_vl_moe", seed=7)
    batch = make_batch(model, PROMPTS)
    pio_fvlm.wrap(model, budget=3)
    with torch.no_grad():
        model(**batch)
    got = [k.tolist() for k in pio_fvlm.last_selection(model)]
    pio_fvlm.unwrap(model)
    assert got == [list(k) for k in naive_selection(model, batch, 1, 3)]
    assert_cached_equals_uncached_and_batch_equals_alone(model, PROMPTS, budget=3)
