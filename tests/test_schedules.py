"""Multi-stage schedules: API, per-layer lengths, and the core invariants per stage."""

import pytest
import torch

import pio_fvlm
from helpers import FixedSelector, assert_batch_equals_alone, layer_lengths, n_visual, standard_batch, standard_prompts
from pio_fvlm.schedules import average_budget, preset, schedule_for
from tiny_models import FAMILIES, make_batch, tiny_vlm


def test_average_budget_matches_the_papers_labels():
    assert average_budget([(1, 218), (10, 128), (15, 54)], 32, 576) == 128.0
    assert average_budget([(1, 92), (10, 54), (15, 22)], 32, 576) == 64.0
    assert average_budget([(1, 64)], 32, 576) == pytest.approx((576 + 31 * 64) / 32)


def test_schedule_for_inverts_average_budget():
    assert schedule_for(128) == ((1, 218), (10, 128), (15, 54))  # the authors' own
    assert schedule_for(64) == ((1, 91), (10, 54), (15, 23))  # next to their (92, 54, 22)
    for avg in (64, 96, 128, 192):
        assert average_budget(schedule_for(avg), 32, 576) == pytest.approx(avg, abs=1.0)
    with pytest.raises(ValueError, match="below what layers"):
        schedule_for(10, layers=(16,))


def test_presets():
    assert preset("paper-64") == ((1, 92), (10, 54), (15, 22))
    assert average_budget(preset("paper-192"), 32, 576) == pytest.approx(192, abs=1)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("paper-7")
    # fractions: 11.1 % of the visual tokens per layer on average, whatever their count
    for n in (576, 2880):
        counts = [(layer, round(f * n)) for layer, f in preset("paper-11%")]
        assert average_budget(counts, 32, n) / n == pytest.approx(64 / 576, abs=0.002)


@pytest.mark.parametrize("depth", [28, 36, 24, 40])
@pytest.mark.parametrize("name", ["paper-64", "paper-128", "paper-192", "paper-11%"])
def test_presets_scale_to_the_models_depth_and_keep_their_average(name, depth):
    at_32 = average_budget(preset(name), 32, 576)
    scaled = preset(name, depth)
    assert average_budget(scaled, depth, 576) == pytest.approx(at_32, abs=0.5)
    layers = [layer for layer, _ in scaled]
    assert layers == [max(1, round(at * depth / 32)) for at, _ in preset(name)]  # same share of the model
    assert preset(name, 32) == preset(name)


def test_a_scaled_preset_prunes_a_deeper_model():
    model = tiny_vlm("llava", num_layers=12)
    pio_fvlm.wrap(model, preset="paper-192")
    assert pio_fvlm.get_config(model).schedule == preset("paper-192", 12)
    assert [layer for layer, _ in pio_fvlm.get_config(model).schedule] == [1, 4, 6]


@pytest.mark.parametrize(
    "schedule, words",
    [
        ([(2, 5), (1, 3)], "strictly increasing"),
        ([(1, 5), (1, 3)], "strictly increasing"),  # a layer named twice
        ([(1, 3), (2, 5)], "must not increase"),
        ([(1, 3), (4, 2)], "out of range"),
        ([(0, 3)], "out of range"),
        ([(1, 0)], "keep no visual token"),
        ([(1, 0.5), (2, 3)], "not mixed"),
        ([], "non-empty"),
        ("1,3", "non-empty"),
        ([(1,)], "pair"),
    ],
)
def test_bad_schedules(schedule, words):
    model = tiny_vlm("llava")
    with pytest.raises((ValueError, TypeError), match=words):
        pio_fvlm.wrap(model, schedule=schedule)


def test_schedule_excludes_budget_and_layer():
    model = tiny_vlm("llava")
    with pytest.raises(ValueError, match="replaces budget"):
        pio_fvlm.wrap(model, budget=4, schedule=[(1, 5), (2, 3)])
    with pytest.raises(ValueError, match="replaces budget"):
        pio_fvlm.wrap(model, layer=2, preset="paper-64")
    with pytest.raises(ValueError, match="either preset"):
        pio_fvlm.wrap(model, preset="paper-64", schedule=[(1, 5)])
    with pytest.raises(ValueError, match="pass budget= and layer= instead"):
        pio_fvlm.wrap(model, preset="paper-64")  # 4 layers: layer 0 alone spends more than 64 per layer


@pytest.fixture(params=FAMILIES)
def deep_model(request):
    return tiny_vlm(request.param, num_layers=6, seed=7)


def test_per_layer_lengths_follow_the_schedule(deep_model):
    model = deep_model
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, schedule=[(1, 6), (3, 4), (5, 2)])
    with torch.no_grad(), layer_lengths(model) as seen:
        out = model(**inputs, use_cache=True)
    length = inputs["input_ids"].shape[1]
    counts = n_visual(inputs)

    def short(k):
        return max(length - n + min(n, k) for n in counts)

    assert [seen[i] for i in range(6)] == [length, short(6), short(6), short(4), short(4), short(2)]
    assert [out.past_key_values.get_seq_length(i) for i in range(6)] == [seen[i] for i in range(6)]
    s1, s2, s3 = (pio_fvlm.last_selection(model, stage=i) for i in range(3))
    for a, b, c, n in zip(s1, s2, s3, counts):
        assert (len(a), len(b), len(c)) == (min(n, 6), min(n, 4), min(n, 2))
        assert set(c.tolist()) <= set(b.tolist()) <= set(a.tolist())
    assert [x.tolist() for x in pio_fvlm.last_selection(model)] == [x.tolist() for x in s3]
    with pytest.raises(ValueError, match="out of range"):
        pio_fvlm.last_selection(model, stage=3)


def test_multi_stage_cached_equals_uncached(deep_model):
    model = deep_model
    inputs = standard_batch(model)
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[0, 1, 2, 3, 4],
              return_dict_in_generate=True, output_logits=True)
    modes = ("keep", "compact") if model.config.model_type.startswith("llava") else ("keep",)
    for positions in modes:
        pio_fvlm.wrap(model, schedule=[(1, 6), (3, 4), (5, 2)], positions=positions, selector=FixedSelector())
        cached = model.generate(**inputs, **kw)
        uncached = model.generate(**inputs, use_cache=False, **kw)
        assert torch.equal(cached.sequences, uncached.sequences), positions
        for a, b in zip(cached.logits, uncached.logits):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), positions


def test_multi_stage_batch_equals_samples_alone(deep_model):
    model = deep_model
    prompts = standard_prompts(model)
    batch = make_batch(model, prompts, seed=2)
    pio_fvlm.wrap(model, schedule=[(1, 6), (3, 4), (5, 2)])
    assert_batch_equals_alone(model, prompts, batch)


def test_stage_that_keeps_everything_is_a_pass_through():
    model = tiny_vlm("llava", num_layers=6, seed=7)
    inputs = standard_batch(model)
    n = max(n_visual(inputs))
    pio_fvlm.wrap(model, schedule=[(1, n), (3, 4)], selector=FixedSelector())
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[0, 1, 2, 3, 4])
    cached = model.generate(**inputs, **kw)
    uncached = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert [len(s) for s in pio_fvlm.last_selection(model, stage=0)] == n_visual(inputs)


def test_the_presets_are_the_authors_schedules():
    assert preset("paper-128") == ((1, 218), (10, 128), (15, 54))
    assert preset("paper-64") == ((1, 92), (10, 54), (15, 22))
    assert average_budget(preset("paper-128"), 32, 576) == 128 and average_budget(preset("paper-64"), 32, 576) == 64


def test_a_fraction_that_rounds_to_nothing_still_keeps_one_token():
    assert average_budget([(1, 0.0001)], 32, 576) == pytest.approx((576 + 31 * 1) / 32)


def test_schedule_for_refuses_an_average_the_first_layers_already_spend():
    # layer 0 alone spends 576 tokens: an average of 18 over 32 layers leaves nothing for the stages
    with pytest.raises(ValueError, match=r"below what layers 0\.\.0 already spend"):
        schedule_for(18, layers=(1,))
    assert schedule_for(19, layers=(1,)) == ((1, 1),)


def test_presets_on_shallow_models():
    # rounding would put two stages at one layer: each moves one layer after the previous
    assert [layer for layer, _ in preset("paper-128", 5)] == [1, 2, 3]
    with pytest.raises(ValueError, match="needs at least 4 decoder layers"):
        preset("paper-128", 3)  # three stages need layers 1, 2, 3
    with pytest.raises(ValueError, match="cannot keep its average on a 8-layer model"):
        preset("paper-64", 8)  # layer 0 alone spends more than 64 x 8 tokens


def test_a_layer_out_of_range_names_the_range():
    model = tiny_vlm("llava")  # 4 decoder layers: prune layers 1..3
    with pytest.raises(ValueError, match=r"an int in 1\.\.3 for this 4-layer"):
        pio_fvlm.wrap(model, schedule=[(1, 3), (4, 2)])


class FirstCandidates:
    """Keeps each row's first candidates in sequence order, and records what each stage was offered."""

    def __init__(self):
        self.offered = []

    def __call__(self, request):
        self.offered.append((request.candidates.sum(1).tolist(), request.candidate_counts))
        rank = request.candidates.long().cumsum(1)
        return request.candidates & (rank <= request.budgets.view(-1, 1))


def test_a_later_stage_is_offered_exactly_the_survivors_of_the_one_before():
    """The survivors include the visual token at position 0 (a prompt that starts with its image)."""
    from tiny_models import Prompt

    model = tiny_vlm("llava", num_layers=4, seed=3)
    inputs = make_batch(model, [Prompt(before=[], after=[9, 10, 11, 12, 13])])
    assert inputs["input_ids"][0, 0] == model.config.image_token_id
    selector = FirstCandidates()
    pio_fvlm.wrap(model, schedule=[(1, 6), (2, 3)], selector=selector)
    with torch.no_grad():
        model(**inputs)
    assert selector.offered[1] == ([6], [6])
    first, second = (pio_fvlm.last_selection(model, stage)[0].tolist() for stage in (0, 1))
    assert first == list(range(6)) and second == [0, 1, 2]
