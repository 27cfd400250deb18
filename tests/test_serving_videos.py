"""Video parts in chat requests and batch rows, through the serving core on tiny Qwen-VL checkpoints.

The checkpoints' processors are the families' own classes (tokenizer, chat template, the expansion
of each video into its visual tokens); their video processor is a torch-only stand-in
(``tiny_checkpoints.frames_video_processor``), since transformers' video processors need
torchvision. Greedy answers to video prompts in a batch equal each prompt alone, and every
prompt's visual tokens (its video's) are pruned to the budget.
"""

import json

import numpy as np
import pytest

from helpers import assert_batch_answers_equal_alone
from pio_fvlm import wrap
from pio_fvlm.serving.batch_rows import answer_rows, row_request
from pio_fvlm.serving.checks import check_chat_request
from pio_fvlm.serving.client import image_data_url
from pio_fvlm.serving.core import BadRequest, BatchGenerator, chat_request_from_openai
from tiny_checkpoints import frames_video_processor, load_checkpoint, tiny_checkpoint

BUDGET = 3
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _frame(seed, size=(40, 40)):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _video_body(text, frames, image=None, max_tokens=3):
    content = [{"type": "video", "video": [image_data_url(f) for f in frames]}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    content.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def generator(request, tmp_path_factory):
    folder = tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    model, processor = load_checkpoint(folder)
    processor.video_processor = frames_video_processor(model)
    return BatchGenerator(wrap(model, budget=BUDGET), processor)


def _requests():
    return [chat_request_from_openai(_video_body("w1 w2 w3", [_frame(1), _frame(2), _frame(3), _frame(4)])),
            chat_request_from_openai(_video_body("w4", [_frame(5), _frame(6)])),
            chat_request_from_openai(_video_body("w5 w6", [_frame(7), _frame(8)], image=_frame(9, (50, 120))))]


def test_video_answers_in_a_batch_equal_each_request_alone(generator):
    requests = _requests()
    batched = assert_batch_answers_equal_alone(generator, requests)
    assert [a.batch_size for a in batched] == [2, 2, 1]  # video + image prompts in a batch of their own
    # 4 x 4 patches per frame pair merged 2 x 2: 4 tokens per 2 frames; the image adds its own
    assert [a.visual_seen for a in batched[:2]] == [8, 4]
    assert batched[2].visual_seen > 4
    assert all(a.visual_kept == BUDGET for a in batched)


def test_a_bad_video_request_fails_alone(generator):
    requests = _requests()[:2]
    bad = chat_request_from_openai(_video_body("w7", [_frame(10), _frame(11)]))
    bad.videos.append(bad.videos[0])  # two videos for one video part
    answers = generator.generate([requests[0], bad, requests[1]])
    assert isinstance(answers[1], BadRequest) and "1 video part(s) but 2 video(s)" in str(answers[1])
    assert [a.text for a in (answers[0], answers[2])] == [a.text for a in generator.generate(requests)]


def test_a_batch_row_with_a_video_is_answered_as_the_core_answers_it(generator):
    frames = [np.asarray(_frame(s)) for s in (1, 2, 3, 4)]
    rows = [{"id": 1, "prompt": "w1 w2 w3", "video": frames},
            {"id": 2, "prompt": "w4", "videos": [np.stack([np.asarray(_frame(5)), np.asarray(_frame(6))])]},
            {"id": 3, "prompt": "w8", "video": "not a list of frames"}]
    answered = answer_rows(generator, rows, max_new_tokens=3)
    core = generator.generate(_requests()[:2])
    assert [r["answer"] for r in answered[:2]] == [a.text.strip() for a in core]
    assert [r["visual_tokens_seen"] for r in answered[:2]] == [8, 4]
    assert [r["visual_tokens_kept"] for r in answered[:2]] == [BUDGET, BUDGET]
    assert "video 0 must be a list of its frames" in answered[2]["error"]
    assert all("video" not in r and "videos" not in r for r in answered)


def test_a_processor_without_videos_refuses_them_with_a_message(tmp_path):
    folder = tiny_checkpoint("llava", tmp_path)
    model, processor = load_checkpoint(folder)
    generator = BatchGenerator(wrap(model, budget=BUDGET), processor)
    answer = generator.generate([chat_request_from_openai(_video_body("w1", [_frame(1), _frame(2)]))])[0]
    assert isinstance(answer, BadRequest) and "takes no videos" in str(answer)


def test_a_video_part_becomes_one_array_of_its_frames():
    request = chat_request_from_openai(_video_body("w1", [_frame(1), _frame(2), _frame(3)]))
    assert request.messages[0]["content"][0] == {"type": "video"}
    assert len(request.videos) == 1 and request.videos[0].shape == (3, 40, 40, 3)
    assert request.videos[0].dtype == np.uint8 and np.array_equal(request.videos[0][1], np.asarray(_frame(2)))
    with pytest.raises(BadRequest, match="frame 0 is 40 x 40, frame 1 is 60 x 40"):
        chat_request_from_openai(_video_body("w1", [_frame(1), _frame(2, (40, 60))]))
    same = row_request({"prompt": "w1", "video": [np.asarray(_frame(s)) for s in (1, 2, 3)]}, 3)
    assert np.array_equal(same.videos[0], request.videos[0])


@pytest.mark.parametrize("part, words", [
    ({"type": "video"}, "needs 'video': a non-empty list"),
    ({"type": "video", "video": []}, "needs 'video': a non-empty list"),
    ({"type": "video", "video": "data:image/png;base64,AAAA"}, "needs 'video': a non-empty list"),
    ({"type": "video", "video": ["file:///tmp/frame.png"]}, "video frame 0: image_url.url must be an http"),
    ({"type": "video", "video": ["x"] * 513}, "at most 512"),
    ({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}, "send the video as its frames"),
])
def test_a_malformed_video_part_gets_a_message(part, words):
    body = json.dumps({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "w1"}]}]})
    problem = check_chat_request(body.encode())
    assert problem is not None and words in problem and problem.startswith("messages[0].content[0]")
