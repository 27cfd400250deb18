"""`pio-fvlm serve`: a real transformers server in a subprocess on 127.0.0.1, the shipped demo model."""

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

from pio_fvlm import last_selection, wrap  # noqa: E402
from pio_fvlm import synthetic as syn  # noqa: E402
from pio_fvlm.serving.client import ServerProcess, chat_body, image_data_url, post_chat  # noqa: E402
from pio_fvlm.serving.http import check_chat_request, sse_with_visual_tokens  # noqa: E402
from pio_fvlm.serving.report import VisualTokens  # noqa: E402
from pio_fvlm.shapes_vlm import ASSET_DIR  # noqa: E402

BUDGET = 48


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
    with ServerProcess(["--budget", str(BUDGET)]) as running:
        yield running


@pytest.fixture(scope="module")
def local():
    """The demo model and processor in this process, wrapped as the server's."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = wrap(LlavaForConditionalGeneration.from_pretrained(ASSET_DIR).eval(), budget=BUDGET)
    return model, AutoProcessor.from_pretrained(ASSET_DIR)


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
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    image, qa = scenes(1, seed=11)[0]
    expected, _ = local_answer(local, image, qa.question)
    messages = chat_body(qa.question, image)["messages"]
    reply = client.chat.completions.create(model="pio-fvlm-demo", messages=messages)
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.model_extra["visual_tokens"] == {"seen": 576, "kept": BUDGET}
    chunks = list(client.chat.completions.create(model="pio-fvlm-demo", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == expected
    assert chunks[-1].usage.model_extra["visual_tokens"] == {"seen": 576, "kept": BUDGET}


def test_eight_concurrent_requests_all_answered_correctly(server, local):
    asked = scenes(8, seed=21)
    expected = [local_answer(local, image, qa.question)[0] for image, qa in asked]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda item: post_chat(server.url, chat_body(item[1].question, item[0])), asked))
    assert [status for status, _, _ in replies] == [200] * 8
    assert [r["choices"][0]["message"]["content"].strip() for _, _, r in replies] == expected
    assert all(r["usage"]["visual_tokens"] == {"seen": 576, "kept": BUDGET} for _, _, r in replies)


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


def test_streamed_usage_event_gets_the_visual_tokens_and_other_events_stay():
    first = 'data: {"choices":[{"delta":{"content":"red"}}]}'
    last = 'data: {"choices":[],"usage":{"prompt_tokens":583}}'
    out = sse_with_visual_tokens(f"{first}\n\n{last}\n\n".encode(), VisualTokens(seen=576, kept=64)).decode()
    events = out.split("\n\n")
    assert events[0] == first
    assert json.loads(events[1][len("data: "):])["usage"]["visual_tokens"] == {"seen": 576, "kept": 64}


@pytest.mark.slow
def test_bad_settings_are_refused_at_startup_with_wraps_message():
    from pio_fvlm import PruneConfig

    with pytest.raises(ValueError) as wrapped:
        PruneConfig(budget=-3).validate(4)
    run = subprocess.run([sys.executable, "-m", "pio_fvlm.cli", "serve", "--budget", "-3", "--port", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert str(wrapped.value) in run.stderr
    both = subprocess.run([sys.executable, "-m", "pio_fvlm.cli", "serve", "--no-pruning", "--budget", "8"],
                          capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "--no-pruning serves the model unpruned" in both.stderr


def test_load_benchmark_measures_a_running_server(server):
    from helpers import load_script

    bench = load_script("benchmarks/serve_load.py")
    bodies = bench.request_bodies("pio-fvlm-demo", 4, max_tokens=2)
    row = bench.measure_load(server.url, bodies, clients=2, requests=2)
    assert row["requests"] == row["ok"] == 4
    assert row["visual_tokens"] == [{"seen": 576, "kept": BUDGET}]
    assert 0 < row["p50_ms"] <= row["p95_ms"] and row["requests_per_s"] > 0
    rows = [{"server": s, **row} for s in ("pruned", "unpruned")]
    assert bench.table(rows).splitlines()[2].startswith("| 2 | ")
