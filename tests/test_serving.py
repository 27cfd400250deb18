"""`pio-fvlm serve`: a real server in a subprocess on 127.0.0.1 and its batched-generation core, on the
shipped demo model."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="serving needs the serve extra: pip install -e '.[serve]'")

from PIL import Image  # noqa: E402

from helpers import SERVING_BUDGET as BUDGET  # noqa: E402
from pio_fvlm import last_selection  # noqa: E402
from pio_fvlm import synthetic as syn  # noqa: E402
from pio_fvlm.serving.checks import check_chat_request  # noqa: E402
from pio_fvlm.serving.client import ServerProcess, chat_body, image_data_url, post_chat  # noqa: E402
from pio_fvlm.serving.core import BadRequest, BatchGenerator, ChatAnswer, chat_request_from_openai  # noqa: E402


def scenes(n: int, seed: int = 5) -> list[tuple[Image.Image, syn.QA]]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        objects = syn.random_scene(rng, rng.randint(1, 3))
        image = Image.fromarray(syn.render(objects, rng))
        out += [(image, qa) for qa in syn.questions(objects, rng)[:2]]
    return out[:n]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--engine", "local", "--budget", str(BUDGET)]) as running:
        yield running


def local_answer(local, image: Image.Image, question: str) -> tuple[str, int]:
    """What the wrapped model's own generate answers to the chat prompt, and how many visual tokens it kept."""
    model, processor = local
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    kept = len(last_selection(model)[0])
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip(), kept


def test_chat_completion_equals_the_wrapped_models_generate(server, local):
    for image, qa in scenes(4):
        status, headers, reply = post_chat(server.url, chat_body(qa.question, image))
        assert status == 200, reply
        expected, kept = local_answer(local, image, qa.question)
        assert reply["choices"][0]["message"]["content"].strip() == expected
        assert reply["usage"]["visual_tokens"] == {"seen": 576, "kept": kept} == {"seen": 576, "kept": BUDGET}
        assert headers["x-pio-fvlm-visual-tokens-seen"] == "576"
        assert headers["x-pio-fvlm-visual-tokens-kept"] == str(BUDGET)


def test_openai_client_plain_and_streaming(server, local):
    assert_openai_client_plain_and_streaming(server.url, local, seed=11)


def assert_openai_client_plain_and_streaming(url: str, local, seed: int) -> None:
    """The ``openai`` client's plain and streamed answers equal the wrapped model's own generate."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    image, qa = scenes(1, seed=seed)[0]
    expected, _ = local_answer(local, image, qa.question)
    messages = chat_body(qa.question, image)["messages"]
    reply = client.chat.completions.create(model="pio-fvlm-demo", messages=messages)
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.model_extra["visual_tokens"] == {"seen": 576, "kept": BUDGET}
    chunks = list(client.chat.completions.create(model="pio-fvlm-demo", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == expected
    assert chunks[-1].usage.model_extra["visual_tokens"] == {"seen": 576, "kept": BUDGET}


def test_eight_concurrent_requests_all_answered_correctly(server, local):
    assert_concurrent_requests_answered(server.url, local, 8, seed=21)


def assert_concurrent_requests_answered(url: str, local, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` concurrent requests all answered as the wrapped model's own generate; their headers."""
    asked = scenes(count, seed=seed)
    expected = [local_answer(local, image, qa.question)[0] for image, qa in asked]
    with ThreadPoolExecutor(count) as pool:
        replies = list(pool.map(lambda item: post_chat(url, chat_body(item[1].question, item[0])), asked))
    assert [status for status, _, _ in replies] == [200] * count
    assert [r["choices"][0]["message"]["content"].strip() for _, _, r in replies] == expected
    assert all(r["usage"]["visual_tokens"] == {"seen": 576, "kept": BUDGET} for _, _, r in replies)
    return [headers for _, headers, _ in replies]


BAD_REQUESTS = {
    "not JSON": (b"{not json", "not JSON"),
    "no messages": ({"model": "pio-fvlm-demo"}, "'messages' must be a non-empty list"),
    "empty messages": ({"messages": []}, "'messages' must be a non-empty list"),
    "unknown model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "pio-fvlm-demo"),
    "base64 that is not": (chat_body("how many shapes ?") | {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, "valid base64"),
    "data URL of text": (chat_body("q") | {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}]}]}, "data:image/"),
    "bytes that are no image": (chat_body("q") | {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}]}]},
        "does not decode to an image"),
    "a server-side file path": (chat_body("q") | {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}, "http(s) URL or a data:image"),
    "a video file instead of its frames": (chat_body("q") | {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}}]}]}, "as its frames"),
    "a video to a model that takes none": (chat_body("q") | {"messages": [{"role": "user", "content": [
        {"type": "video", "video": [image_data_url(scenes(1, seed=3)[0][0])] * 2},
        {"type": "text", "text": "how many shapes ?"}]}]}, "takes no videos"),
}


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server, local):
    for name, (body, words) in BAD_REQUESTS.items():
        status, _, reply = post_chat(server.url, body)
        assert 400 <= status < 500, name
        assert words in reply["detail"], (name, reply)
    image, qa = scenes(1, seed=31)[0]
    status, _, reply = post_chat(server.url, chat_body(qa.question, image))
    assert status == 200
    assert reply["choices"][0]["message"]["content"].strip() == local_answer(local, image, qa.question)[0]


def test_text_only_request_reports_no_visual_tokens(server):
    status, _, reply = post_chat(server.url, chat_body("how many shapes ?", max_tokens=2))
    assert status == 200
    assert reply["usage"]["visual_tokens"] == {"seen": 0, "kept": 0}


def test_request_checks_accept_what_the_server_serves():
    image = Image.new("RGB", (8, 8), "red")
    assert check_chat_request(json.dumps(chat_body("q", image)).encode()) is None
    assert check_chat_request(json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()) is None
    url = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    assert check_chat_request(json.dumps({"messages": [{"role": "user", "content": [url]}]}).encode()) is None
    assert image_data_url(image).startswith("data:image/png;base64,")


def test_concurrent_requests_are_generated_in_batches(server):
    asked = scenes(8, seed=41)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda item: post_chat(server.url, chat_body(item[1].question, item[0])), asked))
    sizes = [int(headers["x-pio-fvlm-batch-size"]) for _, headers, _ in replies]
    assert all(1 <= size <= 8 for size in sizes)
    assert max(sizes) > 1, sizes


@pytest.fixture(scope="module")
def generator(local):
    model, processor = local
    return BatchGenerator(model, processor)


def openai_request(question: str, image: Image.Image | None = None, **fields):
    return chat_request_from_openai(chat_body(question, image, **fields))


def test_core_batch_answers_equal_each_request_alone(generator, local):
    asked = scenes(6, seed=51)
    requests = [openai_request(qa.question, image) for image, qa in asked]
    batched = generator.generate(requests)
    assert all(isinstance(answer, ChatAnswer) and answer.batch_size == 6 for answer in batched)
    for (image, qa), answer, request in zip(asked, batched, requests):
        alone = generator.generate([request])[0]
        assert isinstance(alone, ChatAnswer) and alone.batch_size == 1
        assert answer.text.strip() == alone.text.strip() == local_answer(local, image, qa.question)[0]
        assert (answer.visual_seen, answer.visual_kept) == (alone.visual_seen, alone.visual_kept) == (576, BUDGET)
        assert answer.prompt_tokens == alone.prompt_tokens and answer.finish_reason == "stop"


def test_core_streams_each_rows_text_and_splits_incompatible_settings(generator):
    asked = scenes(3, seed=61)
    requests = [openai_request(qa.question, image) for image, qa in asked[:2]]
    requests.append(openai_request(asked[2][1].question, asked[2][0], max_tokens=1))
    requests.append(openai_request("how many shapes ?"))  # text only: a batch of its own
    streamed: list[list[str]] = [[] for _ in requests]
    answers = generator.generate(requests, [pieces.append for pieces in streamed])
    assert [a.batch_size for a in answers] == [2, 2, 1, 1]
    assert ["".join(pieces) for pieces in streamed] == [a.text for a in answers]
    assert answers[2].completion_tokens == 1
    assert (answers[3].visual_seen, answers[3].visual_kept) == (0, 0)


def test_core_a_bad_request_in_a_batch_fails_alone(generator):
    asked = scenes(3, seed=71)
    requests = [openai_request(qa.question, image) for image, qa in asked]
    two_images = openai_request(asked[0][1].question, asked[0][0])
    two_images.images.append(asked[1][0])  # two images for one image placeholder: the processor refuses
    answers = generator.generate([requests[0], two_images, requests[1], requests[2]])
    assert isinstance(answers[1], BadRequest) and "1 image part(s) but 2 image(s)" in str(answers[1])
    expected = generator.generate(requests)
    assert [a.text for a in answers if isinstance(a, ChatAnswer)] == [a.text for a in expected]


@pytest.mark.parametrize("fields, words", [({"max_tokens": 0}, "'max_tokens' must be >= 1"),
                                           ({"temperature": "hot"}, "'temperature' must be a number"),
                                           ({"n": 2}, "only n=1"),
                                           ({"max_tokens": 2.5}, "'max_tokens' must be an integer")])
def test_bad_generation_settings_are_refused_with_a_message(fields, words):
    with pytest.raises(BadRequest, match=words):
        openai_request("how many shapes ?", **fields)


def test_the_cli_refuses_bad_batch_settings():
    for flag, value in (("--max-batch-size", "0"), ("--batch-wait-ms", "-1")):
        done = subprocess.run([sys.executable, "-m", "pio_fvlm.cli", "serve", flag, value], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and flag in done.stderr, done.stderr


@pytest.mark.parametrize("error, kind", [(ValueError("features and tokens do not match"), BadRequest),
                                         (RuntimeError("out of memory"), RuntimeError)])
def test_core_a_request_the_model_refuses_fails_alone_and_keeps_its_kind(generator, monkeypatch, error, kind):
    """A group that fails is retried request by request: the one that fails alone gets its own
    error (a model's ValueError on one request is that request's fault: a 400), the others answers."""
    asked = scenes(3, seed=81)
    requests = [openai_request(qa.question, image) for image, qa in asked]
    poisoned = requests[1]
    original = BatchGenerator._generate_group

    def refusing(self, group, callbacks):
        if any(r is poisoned for r in group):
            raise error
        return original(self, group, callbacks)

    monkeypatch.setattr(BatchGenerator, "_generate_group", refusing)
    answers = generator.generate(requests)
    assert type(answers[1]) is kind and str(error) in str(answers[1])
    assert [a.batch_size for a in answers if isinstance(a, ChatAnswer)] == [1, 1]
