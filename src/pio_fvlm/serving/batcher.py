"""Dynamic batching: requests that arrive together are answered by one batched ``generate``.

One worker thread takes the first waiting request, waits up to ``wait_ms`` for more (at most
``max_batch_size`` in all), and hands the batch to a :class:`~pio_fvlm.serving.core.BatchGenerator`.
Callers get a :class:`concurrent.futures.Future` per request.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from .core import BatchGenerator, ChatAnswer, ChatRequest, TokenCallback


@dataclass
class _Pending:
    request: ChatRequest
    on_text: TokenCallback | None
    future: Future[ChatAnswer]


class DynamicBatcher:
    """Groups concurrent :meth:`submit` calls into batches of at most ``max_batch_size``."""

    def __init__(self, generator: BatchGenerator, max_batch_size: int = 8, wait_ms: float = 10.0) -> None:
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1; got {max_batch_size!r}")
        if wait_ms < 0:
            raise ValueError(f"the batch wait must be >= 0 ms; got {wait_ms!r}")
        self.generator, self.max_batch_size, self.wait_s = generator, max_batch_size, wait_ms / 1000
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="pio-fvlm-batcher", daemon=True)
        self._worker.start()

    def submit(self, request: ChatRequest, on_text: TokenCallback | None = None) -> Future[ChatAnswer]:
        """Queue ``request``; its future gets the answer (or the exception that stopped it)."""
        future: Future[ChatAnswer] = Future()
        self._queue.put(_Pending(request, on_text, future))
        return future

    async def answer(self, request: ChatRequest, on_text: TokenCallback | None = None) -> ChatAnswer:
        """:meth:`submit`, awaited (the app's ``submit`` function)."""
        import asyncio

        return await asyncio.wrap_future(self.submit(request, on_text))

    def close(self) -> None:
        """Stop the worker once the requests queued so far are answered."""
        self._queue.put(None)
        self._worker.join(timeout=60)

    def _next_batch(self) -> list[_Pending] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                answers = self.generator.generate([p.request for p in live], [p.on_text for p in live])
            except BaseException as error:  # noqa: BLE001 (the worker must live on)
                answers = [error if isinstance(error, Exception) else RuntimeError(repr(error))] * len(live)
            for pending, answer in zip(live, answers):
                if isinstance(answer, Exception):
                    pending.future.set_exception(answer)
                else:
                    pending.future.set_result(answer)
