"""``pio-fvlm serve --engine ray``: the same app on Ray Serve, in replicas that batch with ``@serve.batch``.

Each replica loads and wraps the model once and answers the requests Ray routes to it in
batches (at most ``max_batch_size``, waiting ``batch_wait_ms`` for a batch to fill) through the
:class:`~pio_fvlm.serving.core.BatchGenerator`. Ray restarts a replica that dies. A local Ray
cluster is started unless ``address`` names one to join (``"auto"``: the one on this machine).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from .core import ChatAnswer, ChatRequest, TokenCallback
from .server import DEMO_NAME, batch_generator, check_settings

APP_NAME = "pio-fvlm"


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None


@dataclass
class _Pending:
    request: ChatRequest
    on_text: TokenCallback | None


def deployment(model: str, settings: dict[str, Any] | None, *, device: str, dtype: str,
               attn_implementation: str | None, max_batch_size: int, batch_wait_ms: float, replicas: int,
               num_gpus_per_replica: float, num_cpus_per_replica: float = 1.0) -> Any:
    """The bound Ray Serve application: ``replicas`` copies of the pruned model behind the app."""
    from ray import serve

    from .app import build_app

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_gpus": num_gpus_per_replica,
                                                                     "num_cpus": num_cpus_per_replica},
                      max_ongoing_requests=max(2 * max_batch_size, 16), health_check_period_s=2,
                      health_check_timeout_s=30)
    @serve.ingress()
    class PrunedVLM:
        def __init__(self) -> None:
            self.generator = batch_generator(model, settings, device=device, dtype=dtype,
                                             attn_implementation=attn_implementation)
            batched: Any = self._answer_batch  # serve.batch's wrapper: its limits are set per deployment
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_ms / 1000)

        def __serve_build_asgi_app__(self) -> Any:
            return build_app(self.answer, model)

        async def answer(self, request: ChatRequest, on_text: TokenCallback | None) -> ChatAnswer:
            result = await self._answer_batch(_Pending(request, on_text))
            if isinstance(result, Exception):
                raise result
            return result  # type: ignore[no-any-return]

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def _answer_batch(self, pending: list[_Pending]) -> list[ChatAnswer | Exception]:
            # generate runs in a thread: the replica's event loop keeps streaming and accepting requests
            return await asyncio.to_thread(self.generator.generate, [p.request for p in pending],
                                           [p.on_text for p in pending])

    app: Any = PrunedVLM
    return app.bind()


def serve_on_ray(model: str = DEMO_NAME, settings: dict[str, Any] | None = None, *, host: str = "127.0.0.1",
                 port: int = 8000, device: str = "auto", dtype: str = "auto", attn_implementation: str | None = None,
                 max_batch_size: int = 8, batch_wait_ms: float = 10.0, replicas: int = 1,
                 num_gpus_per_replica: float = 0.0, num_cpus_per_replica: float = 1.0, address: str | None = None,
                 block: bool = True) -> None:
    """Serve ``model`` on Ray Serve (see :func:`pio_fvlm.serving.serve` for the shared arguments).

    ``settings`` are checked on the model's configuration before anything is deployed, so bad
    settings raise here with :func:`~pio_fvlm.wrap`'s messages. ``block=False`` returns once the
    replicas answer (``ray.serve.shutdown()`` stops them).
    """
    if not ray_available():
        raise ImportError("the ray engine needs Ray Serve: pip install 'pio-fvlm[ray]' (or --engine local)")
    check_settings(model, settings)
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    app = deployment(model, settings, device=device, dtype=dtype, attn_implementation=attn_implementation,
                     max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, replicas=replicas,
                     num_gpus_per_replica=num_gpus_per_replica, num_cpus_per_replica=num_cpus_per_replica)
    serve.run(app, name=APP_NAME, route_prefix="/")
    if not block:
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped server shuts its replicas down
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
