"""The HTTP side of serving, as one ASGI middleware in front of transformers' app.

For ``POST /v1/chat/completions`` it
- refuses a malformed request with a 400 and a message (not JSON, no ``messages``, an image that is
  neither an http(s) URL nor a base64 ``data:image/...`` URL that decodes to an image) before the
  model sees it;
- gives the request an id (the client's ``X-Request-ID`` header, or a new one) and makes it the
  current request while transformers' handler runs (see :mod:`pio_fvlm.serving.report`);
- adds what was pruned to the answer: ``usage.visual_tokens = {"seen": N, "kept": K}`` (the last
  streamed chunk, the one carrying ``usage``, when streaming) and, for a JSON answer, the headers
  ``X-PIO-FVLM-Visual-Tokens-Seen`` / ``-Kept``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .report import PruningReports, VisualTokens, current_request

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
USAGE_FIELD = "visual_tokens"
HEADER_SEEN = "x-pio-fvlm-visual-tokens-seen"
HEADER_KEPT = "x-pio-fvlm-visual-tokens-kept"
REQUEST_ID_HEADER = b"x-request-id"


def check_image_url(url: object) -> str | None:
    """Why ``url`` cannot be an image of a request, or None when it can."""
    if not isinstance(url, str):
        return f"image_url.url must be a string; got {type(url).__name__}"
    if url.startswith(("http://", "https://")):
        return None  # fetched by the server
    shown = url if len(url) <= 40 else url[:40] + "..."
    if not url.startswith("data:"):
        return f"image_url.url must be an http(s) URL or a data:image/<format>;base64,<data> URL; got {shown!r}"
    header, _, data = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        return f"an image data URL must start with data:image/<format>;base64, ; got {shown!r}"
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return "the image data URL does not hold valid base64"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "the image data URL does not decode to an image (PNG, JPEG, WebP, ... as PIL reads them)"
    return None


def check_chat_request(body: bytes) -> str | None:
    """Why a chat completion request body cannot be served, or None when it can."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "the request body is not JSON: send an object with 'messages' (OpenAI chat completion format)"
    if not isinstance(payload, dict):
        return "the request body must be a JSON object with 'messages'"
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {'role': ..., 'content': ...} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{i}] must be an object with a 'role' string"
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            return f"messages[{i}].content must be a string or a list of parts"
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                return f"messages[{i}].content[{j}] must be an object with a 'type'"
            if part["type"] == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                problem = check_image_url(url)
                if problem is not None:
                    return f"messages[{i}].content[{j}]: {problem}"
    return None


def with_visual_tokens(payload: dict[str, Any], report: VisualTokens) -> dict[str, Any]:
    """``payload`` with ``usage.visual_tokens`` set (when it has a ``usage``)."""
    usage = payload.get("usage")
    if isinstance(usage, dict):
        usage[USAGE_FIELD] = report.as_dict()
    return payload


def sse_with_visual_tokens(chunk: bytes, report: VisualTokens) -> bytes:
    """Server-sent events ``chunk`` with ``usage.visual_tokens`` added to the event that carries ``usage``."""
    events = chunk.decode().split("\n\n")
    for i, event in enumerate(events):
        if event.startswith("data: {") and '"usage"' in event:
            payload = with_visual_tokens(json.loads(event[len("data: "):]), report)
            events[i] = "data: " + json.dumps(payload, separators=(",", ":"))
    return "\n\n".join(events).encode()


class ServingMiddleware:
    """ASGI middleware: checks chat requests, tags them with their id, reports what was pruned."""

    def __init__(self, app: App, reports: PruningReports) -> None:
        self.app = app
        self.reports = reports

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        problem = check_chat_request(body)
        if problem is not None:
            await _send_json(send, 400, {"detail": problem})
            return
        headers = [(k, v) for k, v in scope["headers"] if k != REQUEST_ID_HEADER]
        given = [v for k, v in scope["headers"] if k == REQUEST_ID_HEADER]
        request_id = given[0].decode() if given else uuid.uuid4().hex
        scope = {**scope, "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode())]}
        token = current_request.set(request_id)
        try:
            await self.app(scope, _replay(body, receive), _ReportingSend(send, request_id, self.reports))
        finally:
            current_request.reset(token)
            self.reports.pop(request_id)  # nothing stays behind for a failed or cancelled request


class _ReportingSend:
    """Forwards a response, adding the request's :class:`VisualTokens` to it."""

    def __init__(self, send: Send, request_id: str, reports: PruningReports) -> None:
        self.send, self.request_id, self.reports = send, request_id, reports
        self.start: Message | None = None  # held back while a JSON body is collected
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if content_type.startswith(b"application/json"):
                self.start = message
                return
            await self.send(message)
            return
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        body = message.get("body", b"")
        if self.start is None:  # streaming: the event with usage comes last
            if b'"usage"' in body:
                report = self.reports.pop(self.request_id)
                if report is not None:
                    message = {**message, "body": sse_with_visual_tokens(body, report)}
            await self.send(message)
            return
        self.chunks.append(body)
        if message.get("more_body", False):
            return
        body = b"".join(self.chunks)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
        report = self.reports.pop(self.request_id)
        if report is not None and self.start["status"] == 200:
            body = json.dumps(with_visual_tokens(json.loads(body), report)).encode()
            headers += [(HEADER_SEEN.encode(), str(report.seen).encode()),
                        (HEADER_KEPT.encode(), str(report.kept).encode())]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body read already, then the client's own messages
    (a disconnect: what a streaming response listens for to stop generating)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
