"""Threads, long runs, copies, pickling, save_pretrained, warnings."""

import copy
import io
import logging
import threading

import pytest
import torch

import pio_fvlm
from helpers import standard_batch
from tiny_models import Prompt, make_batch, tiny_vlm

GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[0, 1, 2, 3, 4])


def test_two_threads_never_mix_their_plans():
    model = tiny_vlm("llava", seed=11)
    pio_fvlm.wrap(model, budget=5)
    a = make_batch(model, [Prompt(before=[5, 6], after=[9, 10, 11, 12])], seed=1)
    b_prompts = [Prompt(before=[5], after=[9, 10]), Prompt(before=[7, 8, 9], after=[20, 21, 22, 23, 24])]
    b = make_batch(model, b_prompts, seed=2)
    want = {"a": model.generate(**a, **GEN), "b": model.generate(**b, **GEN)}
    got, errors = {"a": [], "b": []}, []

    def work(name, inputs):
        try:
            for _ in range(8):
                got[name].append(model.generate(**inputs, **GEN))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=("a", a)), threading.Thread(target=work, args=("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in ("a", "b"):
        assert len(got[name]) == 8
        assert all(torch.equal(out, want[name]) for out in got[name]), name


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_long_run_keeps_no_state():
    model = tiny_vlm("llava", seed=12)
    pio_fvlm.wrap(model, budget=4)
    prompts = [Prompt(before=[5] * (1 + i % 5), after=[9] * (2 + i % 7)) for i in range(10)]
    batches = [make_batch(model, [p], seed=i) for i, p in enumerate(prompts)]
    for inputs in batches:  # warm-up: allocator pools, caches of kernels
        model.generate(**inputs, **GEN)
    start = _rss_mb()
    for i in range(200):
        model.generate(**batches[i % len(batches)], **GEN)
    grown = _rss_mb() - start
    info = pio_fvlm.describe(model)
    assert info.cache_records <= 1  # records die with their cache objects
    assert info.open_calls == 0  # every call's context was reset
    assert grown < 50, f"resident memory grew by {grown:.1f} MB over 200 generate calls"


def test_deepcopy_of_a_wrapped_model():
    model = tiny_vlm("llava", seed=13)
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=3)
    want = model.generate(**inputs, **GEN)
    twin = copy.deepcopy(model)
    assert pio_fvlm.is_wrapped(twin) and pio_fvlm.get_config(twin) == pio_fvlm.get_config(model)
    assert torch.equal(twin.generate(**inputs, **GEN), want)
    assert pio_fvlm.last_selection(twin) is not None
    pio_fvlm.unwrap(twin)  # only the copy loses its hooks
    assert pio_fvlm.is_wrapped(model)
    assert torch.equal(model.generate(**inputs, **GEN), want)
    pio_fvlm.unwrap(model)
    assert torch.equal(twin.generate(**inputs, **GEN), model.generate(**inputs, **GEN))


def test_pickle_round_trip_of_a_wrapped_model():
    model = tiny_vlm("qwen2_5_vl", seed=14)
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=3)
    want = model.generate(**inputs, **GEN)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.generate(**inputs, **GEN), want)
    pio_fvlm.unwrap(loaded)
    pio_fvlm.unwrap(model)
    assert torch.equal(loaded.generate(**inputs, **GEN), model.generate(**inputs, **GEN))


def test_save_pretrained_writes_a_clean_model(tmp_path):
    model = tiny_vlm("llava", seed=15)
    inputs = standard_batch(model)
    reference = model.generate(**inputs, **GEN)
    pio_fvlm.wrap(model, budget=3)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "pio" not in text
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert not pio_fvlm.is_wrapped(loaded)
    assert torch.equal(loaded.generate(**inputs, **GEN), reference)


def test_inputs_embeds_warns_once(caplog):
    model = tiny_vlm("llava", seed=16)
    inputs = standard_batch(model)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    pio_fvlm.wrap(model, budget=3)
    with caplog.at_level(logging.WARNING, logger="pio_fvlm"):
        for _ in range(3):
            with torch.no_grad():
                model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    assert sum("inputs_embeds" in r.message for r in caplog.records) == 1


def test_inputs_embeds_of_one_token_are_a_decode_step_and_do_not_warn(caplog):
    """A one-token call never holds visual tokens (a decode step): nothing to warn about; two tokens could."""
    model = tiny_vlm("llava", seed=16)
    embeds = model.get_input_embeddings()(torch.tensor([[5, 6]]))
    pio_fvlm.wrap(model, budget=3)
    with caplog.at_level(logging.WARNING, logger="pio_fvlm"), torch.no_grad():
        model(inputs_embeds=embeds[:, :1])
        assert not any("inputs_embeds" in r.message for r in caplog.records)
        model(inputs_embeds=embeds)
    assert sum("inputs_embeds" in r.message for r in caplog.records) == 1


def test_image_token_count_mismatch_is_a_clear_error():
    model = tiny_vlm("llava", seed=17)
    inputs = standard_batch(model)
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == 3).nonzero()[0]] = 50  # one image token fewer than the image has features
    pio_fvlm.wrap(model, budget=3)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        with torch.no_grad():
            model(**dict(inputs, input_ids=ids))
