"""The serving core (pio_fvlm.serving.core) on a tiny random checkpoint of every family, loaded
with its processor as a real one: greedy answers in a batch equal each request alone, the
visual tokens seen and kept are each request's own, and a bad request fails alone."""

import numpy as np
import pytest

from conftest import INVARIANT_FAMILIES
from helpers import assert_batch_answers_equal_alone
from pio_fvlm import wrap
from pio_fvlm.serving.client import chat_body
from pio_fvlm.serving.core import BadRequest, BatchGenerator, ChatAnswer, chat_request_from_openai
from tiny_checkpoints import load_checkpoint, tiny_checkpoint

BUDGET = 3  # below every image's visual-token count here: every request with an image is pruned
QUESTIONS = [("w1 w2 w3 w4", (40, 40)), ("w5 w6", (50, 120)), ("w7 w8 w9", (120, 60)), ("w10", None)]


def _image(size, seed):
    from PIL import Image

    height, width = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=INVARIANT_FAMILIES)
def generator(request, tmp_path_factory):
    folder = tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    model, processor = load_checkpoint(folder)
    return BatchGenerator(wrap(model, budget=BUDGET), processor)


def _requests():
    return [chat_request_from_openai(chat_body(text, _image(size, seed) if size else None, max_tokens=3,
                                               temperature=0))
            for seed, (text, size) in enumerate(QUESTIONS)]


def test_batched_answers_equal_each_request_alone(generator):
    requests = _requests()
    batched = assert_batch_answers_equal_alone(generator, requests)
    assert [a.batch_size for a in batched] == [3, 3, 3, 1]  # the text-only request goes alone
    assert all(a.visual_seen > BUDGET and a.visual_kept == BUDGET for a in batched[:3])
    assert (batched[3].visual_seen, batched[3].visual_kept) == (0, 0)


def test_a_bad_request_fails_alone(generator):
    requests = _requests()[:3]
    bad = chat_request_from_openai(chat_body("w11", _image((40, 40), 9), max_tokens=3, temperature=0))
    bad.images.append(_image((40, 40), 10))  # two images for one image part
    answers = generator.generate([requests[0], bad, requests[1], requests[2]])
    assert isinstance(answers[1], BadRequest) and "1 image part(s) but 2 image(s)" in str(answers[1])
    assert [a.text for a in answers if isinstance(a, ChatAnswer)] == [a.text for a in generator.generate(requests)]
