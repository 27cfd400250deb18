"""Batched generation for chat requests, with no HTTP in it.

N chat requests -> compatible groups (requests whose generation settings can share one
``generate`` call) -> per group one left-padded batch through the model's processor -> one
``generate`` of the (wrapped) model -> per request: the answer, its token counts and the visual
tokens its prompt had and kept. Padded batches are exact in :mod:`pio_fvlm`, so a request's
greedy answer does not depend on what it was batched with.

A request that fails inside a batch (a prompt the processor refuses, say) is retried alone, so it
fails alone and the others of its group are answered.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import is_wrapped, last_selection
from ..models import visual_token_counts


class BadRequest(ValueError):
    """The request cannot be served as sent; the message says why (an HTTP 400)."""


@dataclass(frozen=True)
class GenerationSettings:
    """What one ``generate`` call of a group shares. ``None``: the model's generation config decides."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.max_new_tokens is not None:
            kwargs["max_new_tokens"] = self.max_new_tokens
        if self.temperature is not None:
            if self.temperature == 0:
                kwargs["do_sample"] = False
            else:
                kwargs.update(do_sample=True, temperature=self.temperature)
        if self.top_p is not None and kwargs.get("do_sample", False):
            kwargs["top_p"] = self.top_p
        return kwargs


@dataclass
class ChatRequest:
    """One chat conversation to answer.

    ``messages`` are in the processor's chat format (an image part is ``{"type": "image"}``, a
    video part ``{"type": "video"}``), ``images`` the PIL images of the image parts and ``videos``
    the videos of the video parts, in order: each a (T, H, W, 3) uint8 array of its frames (see
    :func:`video_of_frames`).
    """

    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    videos: list[Any] = field(default_factory=list)

    def check(self) -> None:
        """A :class:`BadRequest` unless every image and video part has its image or video (some
        processors would silently pair them otherwise)."""
        for kind, given in (("image", self.images), ("video", self.videos)):
            parts = sum(1 for m in self.messages if isinstance(m.get("content"), list)
                        for part in m["content"] if part.get("type") == kind)
            if parts != len(given):
                raise BadRequest(f"the messages have {parts} {kind} part(s) but {len(given)} {kind}(s) were given")

    def group_key(self) -> tuple[GenerationSettings, bool, bool]:
        # Text-only, image and video prompts go to separate batches: a processor that expands
        # placeholders wants images (videos) for every row of a batch that has any.
        return self.settings, bool(self.images), bool(self.videos)


@dataclass(frozen=True)
class ChatAnswer:
    """The answer to one :class:`ChatRequest`.

    ``visual_seen``: visual tokens in the prompt; ``visual_kept``: how many of them the deepest
    layers kept (``== visual_seen`` when nothing was pruned). ``batch_size``: requests in the
    ``generate`` call that produced it. ``finish_reason``: ``"stop"`` (an end token) or ``"length"``.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    visual_seen: int
    visual_kept: int
    batch_size: int
    finish_reason: str


DEFAULT_MAX_NEW_TOKENS = 256  # when neither the request nor the model's generation config sets one
TokenCallback = Callable[[str], None]  # receives each new piece of an answer's text as it is generated


def decode_image_url(url: str) -> Any:
    """A PIL image from a ``data:image/...;base64,`` URL or an ``http(s)`` URL."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        raw = base64.b64decode(url.partition(",")[2])
    elif url.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (http(s) only, checked above)
                raw = response.read()
        except OSError as error:
            raise BadRequest(f"could not fetch the image {url[:80]!r}: {error}") from error
    else:
        raise BadRequest("an image URL must be http(s) or data:image/<format>;base64,<data>")
    try:
        image = Image.open(io.BytesIO(raw))
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise BadRequest(f"the image {url[:40]!r}... does not decode to an image") from error


def video_of_frames(frames: Sequence[Any]) -> Any:
    """A video as the processors take it, (T, H, W, 3) uint8, from its frames (PIL images of one size)."""
    import numpy as np

    if not frames:
        raise BadRequest("a video needs at least one frame")
    sizes = [frame.size for frame in frames]
    if len(set(sizes)) > 1:
        odd = next(i for i, size in enumerate(sizes) if size != sizes[0])
        raise BadRequest(f"a video's frames must share one size: frame 0 is {sizes[0][0]} x {sizes[0][1]}, "
                         f"frame {odd} is {sizes[odd][0]} x {sizes[odd][1]}")
    return np.stack([np.asarray(frame.convert("RGB"), dtype=np.uint8) for frame in frames])


def chat_request_from_openai(payload: dict[str, Any]) -> ChatRequest:
    """A :class:`ChatRequest` from an OpenAI chat completion body (checked already by
    :func:`pio_fvlm.serving.checks.check_chat_request`): ``image_url`` parts become image parts, and
    ``{"type": "video", "video": [frame URL, ...]}`` parts (a video as its frames, as Qwen's API
    takes it) video parts."""
    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    videos: list[Any] = []
    for message in payload["messages"]:
        content = message.get("content")
        if content is None or isinstance(content, str):
            messages.append({"role": message["role"], "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part["type"] == "image_url":
                image = part["image_url"]
                images.append(decode_image_url(image["url"] if isinstance(image, dict) else image))
                parts.append({"type": "image"})
            elif part["type"] == "video":
                videos.append(video_of_frames([decode_image_url(url) for url in part["video"]]))
                parts.append({"type": "video"})
            elif part["type"] == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            else:
                raise BadRequest(f"content parts of type {part['type']!r} are not served; use 'text', 'image_url' "
                                 f"and 'video' (frames as a list of image URLs)")
        messages.append({"role": message["role"], "content": parts})
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    settings = GenerationSettings(
        max_new_tokens=_optional(max_tokens, "max_tokens", int, minimum=1),
        temperature=_optional(payload.get("temperature"), "temperature", float, minimum=0),
        top_p=_optional(payload.get("top_p"), "top_p", float, minimum=0),
        seed=_optional(payload.get("seed"), "seed", int, minimum=None),
    )
    if payload.get("n", 1) != 1:
        raise BadRequest("only n=1 is served: send one request per answer")
    return ChatRequest(messages=messages, images=images, settings=settings, videos=videos)


def _optional(value: Any, name: str, kind: type, minimum: float | None) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"'{name}' must be a{'n integer' if kind is int else ' number'}; got {value!r}")
    if minimum is not None and value < minimum:
        raise BadRequest(f"'{name}' must be >= {minimum}; got {value!r}")
    return kind(value)


class _RowStreamer:
    """A ``generate`` streamer that hands each row's new text to that row's callback, up to and
    including the row's first end token."""

    def __init__(self, tokenizer: Any, callbacks: Sequence[TokenCallback | None], eos: set[int]) -> None:
        self.tokenizer, self.callbacks, self.eos = tokenizer, callbacks, eos
        self.tokens: list[list[int]] = [[] for _ in callbacks]
        self.sent = [""] * len(callbacks)
        self.done = [False] * len(callbacks)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            self.tokens[row].append(token)  # an end token too: the demo model's answer words are end tokens
            self.done[row] = token in self.eos
            callback = self.callbacks[row]
            if callback is not None:
                text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
                if len(text) > len(self.sent[row]) and not text.endswith("\ufffd"):  # whole characters only
                    callback(text[len(self.sent[row]):])
                    self.sent[row] = text

    def end(self) -> None:
        pass


class BatchGenerator:
    """Answers lists of :class:`ChatRequest` with batched ``generate`` calls of ``model``.

    Args:
        model: a VLM, wrapped by :func:`pio_fvlm.wrap` or not (then ``visual_kept == visual_seen``).
        processor: its processor (chat template, tokenizer, image processor).
    Calls are serialised (one ``generate`` at a time per model): a lock makes it safe to call
    from several threads.
    """

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"  # generate continues each row at the right end
        self._lock = threading.Lock()
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        self.eos: set[int] = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    def generate(self, requests: Sequence[ChatRequest],
                 on_text: Sequence[TokenCallback | None] | None = None) -> list[ChatAnswer | Exception]:
        """Per request, its answer or the exception that stopped it. ``on_text[i]`` (if given)
        receives request ``i``'s answer text piece by piece while it is generated."""
        callbacks = list(on_text) if on_text is not None else [None] * len(requests)
        groups: dict[tuple[GenerationSettings, bool, bool], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.group_key(), []).append(index)
        results: list[ChatAnswer | Exception | None] = [None] * len(requests)
        for indices in groups.values():
            try:
                answers: list[ChatAnswer | Exception] = list(
                    self._generate_group([requests[i] for i in indices], [callbacks[i] for i in indices]))
            except Exception as error:  # noqa: BLE001 (one bad request must not fail its group)
                if len(indices) == 1:
                    answers = [_as_request_error(error)]
                else:
                    answers = [self._alone(requests[i], callbacks[i]) for i in indices]
            for i, answer in zip(indices, answers):
                results[i] = answer
        return [r if r is not None else RuntimeError("no answer") for r in results]

    def _alone(self, request: ChatRequest, callback: TokenCallback | None) -> ChatAnswer | Exception:
        try:
            return self._generate_group([request], [callback])[0]
        except Exception as error:  # noqa: BLE001
            return _as_request_error(error)

    def prepare(self, requests: Sequence[ChatRequest]) -> dict[str, Any]:
        """The processor's left-padded batch of ``requests``' prompts, on the model's device."""
        for request in requests:
            request.check()
        texts = [self.processor.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
                 for r in requests]
        images = [image for r in requests for image in r.images]
        videos = [video for r in requests for video in r.videos]
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            if getattr(self.processor, "video_processor", None) is None:
                raise BadRequest("this model's processor takes no videos: send images")
            kwargs["videos"] = videos
        try:
            inputs = self.processor(**kwargs)
        except (ValueError, TypeError, IndexError) as error:
            raise BadRequest(f"the processor cannot build this prompt: {error}") from error
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor)
                else v for k, v in inputs.items()}

    def _generate_group(self, requests: Sequence[ChatRequest],
                        callbacks: Sequence[TokenCallback | None]) -> list[ChatAnswer]:
        inputs = self.prepare(requests)
        input_ids = inputs["input_ids"]
        prompt_tokens = [int(n) for n in inputs["attention_mask"].sum(1).tolist()] if "attention_mask" in inputs \
            else [input_ids.shape[1]] * len(requests)
        seen = visual_token_counts(self.model, input_ids)
        settings = requests[0].settings
        streamer = _RowStreamer(self.tokenizer, callbacks, self.eos)
        with self._lock, torch.inference_mode():
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            generate: Any = self.model.generate
            out = generate(**inputs, **self._generate_kwargs(settings), streamer=streamer)
            selection = last_selection(self.model) if is_wrapped(self.model) and any(seen) else None
        kept = [len(row) for row in selection] if selection is not None else seen
        new_tokens = out[:, input_ids.shape[1]:].tolist()
        answers = []
        for row in range(len(requests)):
            tokens = _through_eos(new_tokens[row], self.eos)
            answers.append(ChatAnswer(text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                                      prompt_tokens=prompt_tokens[row], completion_tokens=len(tokens),
                                      visual_seen=seen[row], visual_kept=kept[row], batch_size=len(requests),
                                      finish_reason="stop" if tokens and tokens[-1] in self.eos else "length"))
        return answers

    def _generate_kwargs(self, settings: GenerationSettings) -> dict[str, Any]:
        kwargs = settings.generate_kwargs()
        if "max_new_tokens" not in kwargs and getattr(self.model.generation_config, "max_new_tokens", None) is None:
            kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        return kwargs


def _as_request_error(error: Exception) -> Exception:
    """A ValueError of the processor or the model on one request alone is that request's fault
    (its images do not fit its prompt, say): a :class:`BadRequest`. Anything else stays a failure."""
    if isinstance(error, ValueError) and not isinstance(error, BadRequest):
        return BadRequest(f"the model cannot take this request: {error}")
    return error


def _through_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """``tokens`` up to and including the first end token (what follows it is padding)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens
