"""The OpenAI-compatible HTTP app: ``/v1/chat/completions`` (plain and streaming), ``/v1/models``,
``/health``, over a function that answers one chat request (in a batch: the in-process
:class:`~pio_fvlm.serving.batcher.DynamicBatcher`, or Ray Serve's ``@serve.batch``).

Responses are built with the ``openai`` package's own types. Each answer carries what was pruned
(``usage.visual_tokens = {"seen": N, "kept": K}``; for a plain answer also the headers
``X-PIO-FVLM-Visual-Tokens-Seen`` / ``-Kept``) and the size of the batch it was generated in
(header ``X-PIO-FVLM-Batch-Size``; when streaming, ``usage.batch_size`` too).
"""


import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .checks import check_chat_request
from .core import BadRequest, ChatAnswer, ChatRequest, TokenCallback, chat_request_from_openai

# Answers one request (``on_text`` gets its text piece by piece, from any thread), in a batch with others.
Submit = Callable[[ChatRequest, TokenCallback | None], Awaitable[ChatAnswer]]

USAGE_FIELD = "visual_tokens"
HEADER_SEEN = "X-PIO-FVLM-Visual-Tokens-Seen"
HEADER_KEPT = "X-PIO-FVLM-Visual-Tokens-Kept"
HEADER_BATCH = "X-PIO-FVLM-Batch-Size"
REQUEST_ID_HEADER = "X-Request-ID"


def _usage(answer: ChatAnswer, *, with_batch_size: bool = False) -> Any:
    from openai.types.completion_usage import CompletionUsage

    extra: dict[str, Any] = {USAGE_FIELD: {"seen": answer.visual_seen, "kept": answer.visual_kept}}
    if with_batch_size:
        extra["batch_size"] = answer.batch_size
    return CompletionUsage(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                           total_tokens=answer.prompt_tokens + answer.completion_tokens, **extra)


def _answer_headers(answer: ChatAnswer, request_id: str) -> dict[str, str]:
    return {HEADER_SEEN: str(answer.visual_seen), HEADER_KEPT: str(answer.visual_kept),
            HEADER_BATCH: str(answer.batch_size), REQUEST_ID_HEADER: request_id}


def build_app(submit: Submit, model_name: str) -> Any:
    """A FastAPI app answering with ``submit`` under the model name ``model_name``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    app = FastAPI(title="pio-fvlm serve")
    created_at = int(time.time())

    def error(status: int, message: str, request_id: str) -> Response:
        return JSONResponse({"detail": message}, status_code=status, headers={REQUEST_ID_HEADER: request_id})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created_at,
                                            "owned_by": "pio_fvlm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        body = await request.body()
        problem = check_chat_request(body)
        if problem is not None:
            return error(400, problem, request_id)
        payload = json.loads(body)
        if payload.get("model") not in (None, model_name):
            return error(400, f"this server serves the model {model_name!r}; got {payload['model']!r}", request_id)
        try:
            chat = chat_request_from_openai(payload)
        except BadRequest as bad:
            return error(400, str(bad), request_id)
        completion_id = f"chatcmpl-{request_id}"
        if payload.get("stream"):
            return StreamingResponse(_stream(chat, completion_id), media_type="text/event-stream",
                                     headers={REQUEST_ID_HEADER: request_id})
        try:
            answer = await submit(chat, None)
        except BadRequest as bad:
            return error(400, str(bad), request_id)
        except Exception as failure:  # noqa: BLE001 (the server keeps serving)
            return error(500, f"generation failed: {type(failure).__name__}: {failure}", request_id)
        completion = ChatCompletion.model_validate({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "finish_reason": answer.finish_reason,
                         "message": {"role": "assistant", "content": answer.text}}],
            "usage": _usage(answer)})
        return Response(completion.model_dump_json(exclude_none=True), media_type="application/json",
                        headers=_answer_headers(answer, request_id))

    async def _stream(chat: Any, completion_id: str) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()

        def on_text(text: str) -> None:  # on the batcher's thread
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        future: asyncio.Future[ChatAnswer] = asyncio.ensure_future(submit(chat, on_text))

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None, last: bool = False) -> str:
            choices = [] if last else [{"index": 0, "delta": delta, "finish_reason": finish}]
            event = ChatCompletionChunk.model_validate({
                "id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage})
            return f"data: {event.model_dump_json(exclude_none=True)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        while not (future.done() and pieces.empty()):
            getter: asyncio.Future[str] = asyncio.ensure_future(pieces.get())
            waiting: set[asyncio.Future[Any]] = {getter, future}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield chunk({"content": getter.result()})
            else:
                getter.cancel()
        try:
            answer = future.result()
        except Exception as failure:  # noqa: BLE001 (reported in the stream: the status line is sent already)
            message = json.dumps({"error": {"message": f"{type(failure).__name__}: {failure}"}})
            yield f"data: {message}\n\n"
            return
        yield chunk({}, finish=answer.finish_reason)
        yield chunk({}, usage=_usage(answer, with_batch_size=True), last=True)
        yield "data: [DONE]\n\n"

    return app
