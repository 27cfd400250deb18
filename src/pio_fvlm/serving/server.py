"""transformers' OpenAI-compatible server (``transformers serve``) with the served model pruned.

Nothing of the server is rewritten: a subclass of its ``ModelManager`` wraps every model it loads
with :func:`pio_fvlm.wrap` (and tags the processor, see :mod:`~pio_fvlm.serving.report`), and the
app it builds gets one middleware (:mod:`~pio_fvlm.serving.http`). Both are handed to
transformers' own ``Serve`` while it starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..api import wrap
from ..models import adapter_for
from .http import ServingMiddleware
from .report import PruningReports

DEMO_NAME = "pio-fvlm-demo"  # the shipped demo model, served under this name


def serving_available() -> bool:
    from transformers.utils.import_utils import is_serve_available

    return bool(is_serve_available())


def _local_name(model_id_and_revision: str) -> str:
    """The demo model's folder for its served name; any other name unchanged."""
    from transformers.cli.serving.utils import split_revision

    from ..shapes_vlm import ASSET_DIR

    model_id, _ = split_revision(model_id_and_revision)
    return str(ASSET_DIR) if model_id == DEMO_NAME else model_id_and_revision


def pruned_model_manager(settings: dict[str, Any] | None, reports: PruningReports) -> type:
    """A subclass of transformers' ``ModelManager`` whose models are wrapped with ``settings``
    (``None``: served unpruned, still reporting the visual tokens seen)."""
    from transformers.cli.serving.model_manager import ModelManager

    class PrunedModelManager(ModelManager):  # type: ignore[misc, valid-type]
        def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None) -> Any:
            processor = super()._load_processor(_local_name(model_id_and_revision), gguf_file=gguf_file)
            return reports.tag_processor(processor)

        def _load_model(self, model_id_and_revision: str, *args: Any, **kwargs: Any) -> Any:
            model = super()._load_model(_local_name(model_id_and_revision), *args, **kwargs)
            if settings is not None:
                wrap(model, **settings)
            visual_ids = adapter_for(model).find_parts(model).visual_token_ids
            return reports.watch_model(model, visual_ids)

    return PrunedModelManager


@contextmanager
def _extended_serve(manager_class: type, reports: PruningReports) -> Iterator[None]:
    """While transformers' ``Serve`` starts: its model manager is ``manager_class`` and its app
    gets the :class:`ServingMiddleware`."""
    from transformers.cli.serving import model_manager as manager_module
    from transformers.cli.serving import server as server_module

    model_manager: Any = manager_module
    server: Any = server_module
    original_manager, original_build = model_manager.ModelManager, server.build_server

    def build_server(manager: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(manager, manager_class):
            raise RuntimeError(
                "this version of transformers' server creates its model manager in a way pio_fvlm cannot "
                "extend, so the model would be served unpruned; use transformers >=5.20,<6"
            )
        app = original_build(manager, *args, **kwargs)
        app.add_middleware(ServingMiddleware, reports=reports)
        return app

    model_manager.ModelManager, server.build_server = manager_class, build_server
    try:
        yield
    finally:
        model_manager.ModelManager, server.build_server = original_manager, original_build


def serve(model: str = DEMO_NAME, settings: dict[str, Any] | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, device: str = "auto", dtype: str = "auto", attn_implementation: str | None = None,
          log_level: str = "warning", block: bool = True) -> Any:
    """Serve ``model`` (an HF id, a folder, or ``"pio-fvlm-demo"``) pruned with the :func:`~pio_fvlm.wrap`
    keywords ``settings`` (``{}``: the defaults; ``None``: unpruned) on ``host:port``.

    The model is loaded and wrapped before the server listens, so bad settings raise here with
    :func:`~pio_fvlm.wrap`'s messages. ``block=False`` returns transformers' ``Serve`` object with the
    server running in a thread (``.kill_server()`` stops it).
    """
    if not serving_available():
        raise ImportError("serving needs transformers' server: pip install 'pio-fvlm[serve]'")
    from transformers.cli.serve import Serve

    reports = PruningReports()
    manager_class = pruned_model_manager(settings, reports)
    with _extended_serve(manager_class, reports):
        return Serve(force_model=model, host=host, port=port, device=device, dtype=dtype,
                     attn_implementation=attn_implementation, log_level=log_level, non_blocking=not block)
