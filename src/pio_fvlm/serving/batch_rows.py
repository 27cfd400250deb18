"""Offline batch inference, one batch of rows at a time: rows of image(s) + prompt -> answers.

A row is a mapping with

- ``prompt``: the question (a string);
- ``image`` (one) or ``images`` (a list), each a file path (relative to ``root``), an
  ``http(s)`` or ``data:image/...;base64,`` URL, encoded image bytes, a ``{"bytes": ...}`` struct
  (as Hugging Face datasets store images in Parquet) or an ``H x W x 3`` uint8 array (as
  ``ray.data.read_images`` gives them); none for a text-only prompt;
- ``video`` (one) or ``videos`` (a list): a video as the list of its frames, each frame in any of
  the image forms above (frames of one size), for models whose processor takes videos;
- any other columns (an ``id``, say), which come back unchanged.

Each row's answer adds ``answer``, ``visual_tokens_seen``, ``visual_tokens_kept``,
``prompt_tokens``, ``completion_tokens``, ``finish_reason`` and ``error``: ``None``, or why the
row could not be answered (an image that cannot be read, a prompt the processor refuses), in
which case the other answer fields are ``None``. A row's fault never stops the others; a fault
of the model or the machine (out of memory, say) raises.

:class:`BatchPredictor` is the callable class for ``ray.data.Dataset.map_batches``::

    ds = ray.data.read_parquet("questions.parquet")
    answers = ds.map_batches(BatchPredictor, fn_constructor_kwargs={"model": "llava-hf/llava-1.5-7b-hf",
                             "settings": {"budget": 64}}, batch_size=8, concurrency=2, num_gpus=1)
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .core import (
    BadRequest,
    BatchGenerator,
    ChatAnswer,
    ChatRequest,
    GenerationSettings,
    decode_image_url,
    video_of_frames,
)

ANSWER_FIELDS = ("answer", "visual_tokens_seen", "visual_tokens_kept", "prompt_tokens", "completion_tokens",
                 "finish_reason", "error")
IMAGE_FIELDS = ("image", "images", "video", "videos")  # read into the prompt, not copied into the answer row
DEFAULT_MAX_NEW_TOKENS = 64


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays (as Ray Data and Parquet give them) made Python values."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [plain(v) for v in value.tolist()]
    return value


def read_image(source: Any, root: Path | None = None) -> Any:
    """A PIL RGB image from any of the forms a row's image may take (see the module's docstring);
    :class:`~pio_fvlm.serving.core.BadRequest` saying why when it cannot be read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Mapping) and "bytes" in source:
        source = source["bytes"] if source["bytes"] is not None else source.get("path")
    if isinstance(source, np.ndarray) and source.dtype != object:
        if source.ndim != 3 or source.shape[2] not in (1, 3, 4):
            raise BadRequest(f"an image array must be H x W x 3 (or 1, 4); got shape {tuple(source.shape)}")
        return Image.fromarray(source.astype(np.uint8).squeeze(2) if source.shape[2] == 1
                               else source.astype(np.uint8)).convert("RGB")
    if isinstance(source, str) and (source.startswith("data:") or "://" in source):
        return decode_image_url(source)  # http(s) or data: (it refuses other schemes)
    if isinstance(source, str):
        path = Path(source) if root is None or Path(source).is_absolute() else root / source
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise BadRequest(f"cannot read the image file {str(path)!r}: {error.strerror or error}") from error
    elif isinstance(source, bytes | bytearray | memoryview):
        raw = bytes(source)
    else:
        raise BadRequest(f"an image must be a path, a URL, bytes or an H x W x 3 array; got {type(source).__name__}")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        shown = f"{source!r}" if isinstance(source, str) else f"{len(raw)} bytes"
        raise BadRequest(f"the image {shown} does not decode to an image") from error


def row_request(row: Mapping[str, Any], max_new_tokens: int, root: Path | None = None) -> ChatRequest:
    """The greedy :class:`~pio_fvlm.serving.core.ChatRequest` of one row (one user turn: videos, images,
    then the prompt)."""
    prompt = plain(row.get("prompt"))
    if not isinstance(prompt, str):
        raise BadRequest(f"a row needs a 'prompt' string; got {type(prompt).__name__}")
    pictures = [read_image(source, root) for source in _one_or_many(row, "image", "images")]
    videos = []
    for k, frames in enumerate(_one_or_many(row, "video", "videos")):
        if getattr(frames, "ndim", None) == 4:  # a T x H x W x 3 array
            frames = list(frames)
        if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
            raise BadRequest(f"video {k} must be a list of its frames (each a path, URL, bytes or array); "
                             f"got {type(frames).__name__}")
        videos.append(video_of_frames([read_image(frame, root) for frame in frames]))
    content = ([{"type": "video"} for _ in videos] + [{"type": "image"} for _ in pictures]
               + [{"type": "text", "text": prompt}])
    return ChatRequest(messages=[{"role": "user", "content": content}], images=pictures, videos=videos,
                       settings=GenerationSettings(max_new_tokens=max_new_tokens, temperature=0))


def _one_or_many(row: Mapping[str, Any], one: str, many: str) -> list[Any]:
    """The row's ``one`` column as a list of one, or its ``many`` column (giving both is refused)."""
    single, several = plain(row.get(one)), plain(row.get(many))
    if single is not None and several is not None:
        raise BadRequest(f"a row has '{one}' or '{many}', not both")
    return [] if single is None and several is None else [single] if single is not None else list(several)


def answer_fields(answer: ChatAnswer | None, error: str | None) -> dict[str, Any]:
    """The answer columns of one row."""
    if answer is None:
        return {name: None for name in ANSWER_FIELDS} | {"error": error}
    return {"answer": answer.text.strip(), "visual_tokens_seen": answer.visual_seen,
            "visual_tokens_kept": answer.visual_kept, "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens, "finish_reason": answer.finish_reason, "error": None}


def answer_rows(generator: BatchGenerator, rows: Sequence[Mapping[str, Any]], *,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, root: Path | None = None) -> list[dict[str, Any]]:
    """Each row (without its image columns) with its answer columns, the rows answered in batched
    ``generate`` calls of ``generator``. Raises when the model fails, not when a row does."""
    results: list[dict[str, Any]] = [{k: plain(v) for k, v in row.items() if k not in IMAGE_FIELDS} for row in rows]
    requests: list[ChatRequest] = []
    positions: list[int] = []
    for i, row in enumerate(rows):
        try:
            requests.append(row_request(row, max_new_tokens, root))
            positions.append(i)
        except BadRequest as error:
            results[i].update(answer_fields(None, str(error)))
    for i, outcome in zip(positions, generator.generate(requests)):
        if isinstance(outcome, BadRequest):
            results[i].update(answer_fields(None, str(outcome)))
        elif isinstance(outcome, Exception):
            raise outcome
        else:
            results[i].update(answer_fields(outcome, None))
    return results


def rows_of(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of a column batch (``{column: values}``, as ``map_batches`` passes it)."""
    columns = {name: list(values) for name, values in batch.items()}
    count = len(next(iter(columns.values()))) if columns else 0
    return [{name: values[i] for name, values in columns.items()} for i in range(count)]


def columns_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The column batch of ``rows`` (every row has the same keys)."""
    return {name: [row[name] for row in rows] for name in (rows[0] if rows else {})}


class RowAnswerer:
    """A callable answering a column batch of rows with ``generator`` (see :func:`answer_rows`)."""

    def __init__(self, generator: BatchGenerator, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 root: str | Path | None = None) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        self.generator, self.max_new_tokens = generator, max_new_tokens
        self.root = Path(root) if root is not None else None

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        rows = answer_rows(self.generator, rows_of(batch), max_new_tokens=self.max_new_tokens, root=self.root)
        return columns_of(rows)


class BatchPredictor(RowAnswerer):
    """The callable class for ``ray.data.Dataset.map_batches``: each actor loads ``model`` once,
    wraps it with the :func:`~pio_fvlm.wrap` keywords ``settings`` (``{}``: the defaults; ``None``:
    unpruned), and answers each batch it is given (see the module's docstring for the columns).

    Args:
        model: an HF id or folder, or ``"pio-fvlm-demo"`` (the shipped demo model).
        device, dtype, attn_implementation: as ``pio-fvlm serve``'s options.
        max_new_tokens: the most tokens of each (greedy) answer.
        root: the folder that relative image paths are read from (default: the working directory).
    """

    def __init__(self, model: str, settings: dict[str, Any] | None = None, *, device: str = "auto",
                 dtype: str = "auto", attn_implementation: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, root: str | Path | None = None) -> None:
        from .server import batch_generator

        super().__init__(batch_generator(model, settings, device=device, dtype=dtype,
                                         attn_implementation=attn_implementation),
                         max_new_tokens=max_new_tokens, root=root)
