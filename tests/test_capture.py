"""The captured probe (torch.compile, one graph per shape bucket) equals the eager closed form."""

import pytest
import torch

import pio_fvlm
from helpers import standard_batch
from pio_fvlm.select import capture
from pio_fvlm.select.closed_form import closed_form_saliency
from test_selection import _probe_inputs
from tiny_models import Prompt, make_batch, tiny_vlm


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_captured_probe_equals_the_eager_closed_form(family):
    """Padding inside the batch (left), GQA and Qwen's biases; the bucket pads the sequence too."""
    model = tiny_vlm(family, attn_implementation="sdpa", seed=8)
    inputs = standard_batch(model)
    inp, mods = _probe_inputs(model, inputs, 1)
    assert capture.bucket_length(inp.hidden.shape[1]) > inp.hidden.shape[1]
    eager = closed_form_saliency(mods, inp)
    with torch.inference_mode():
        captured = capture.captured_saliency(mods, inp)
    valid = inputs["attention_mask"].bool()
    assert captured.shape == eager.shape
    assert torch.allclose(captured[valid], eager[valid], rtol=1e-4, atol=1e-6)


def test_lengths_in_one_bucket_share_one_graph():
    model = tiny_vlm("llava", attn_implementation="sdpa", seed=9)
    short = make_batch(model, [Prompt(before=[5, 6], after=[9, 10, 11, 12, 13])])
    longer = make_batch(model, [Prompt(before=[5, 6, 20, 21], after=[9, 10, 11, 12, 13, 14, 15])])
    first = _probe_inputs(model, short, 1)
    capture.captured_saliency(*reversed(first))  # compiles this bucket (if no earlier test did)
    before = _graphs()
    assert before >= 1  # a graph was really compiled (compilation errors are not suppressed)
    second = _probe_inputs(model, longer, 1)
    got = capture.captured_saliency(*reversed(second))
    assert _graphs() == before
    assert torch.allclose(got, closed_form_saliency(*reversed(second)), rtol=1e-4, atol=1e-6)


def test_wrap_with_capture_selects_and_generates_as_eager():
    model = tiny_vlm("qwen2_vl", attn_implementation="sdpa", seed=10)
    inputs = standard_batch(model)
    kw = dict(max_new_tokens=3, do_sample=False)
    pio_fvlm.wrap(model, budget=3)
    with torch.inference_mode():
        eager = model.generate(**inputs, **kw)
    eager_sel = [s.tolist() for s in pio_fvlm.last_selection(model)]
    pio_fvlm.wrap(model, budget=3, capture=True)
    assert pio_fvlm.get_config(model).capture
    with torch.inference_mode():
        captured = model.generate(**inputs, **kw)
    assert [s.tolist() for s in pio_fvlm.last_selection(model)] == eager_sel
    assert torch.equal(captured, eager)


def test_capture_must_be_a_bool():
    model = tiny_vlm("llava")
    with pytest.raises(TypeError, match="capture must be True or False"):
        pio_fvlm.wrap(model, budget=4, capture="yes")
