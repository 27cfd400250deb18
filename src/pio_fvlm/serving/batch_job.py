"""``pio-fvlm batch INPUT OUTPUT``: answer every row of a JSONL or Parquet file, resumably.

Answers are written to OUTPUT as they come (a JSONL output line by line; a Parquet output
through ``OUTPUT.partial.jsonl`` beside it), so an interrupted job keeps what it finished.
Run again with the same INPUT and OUTPUT, a job skips the rows whose ``id`` is in OUTPUT
already and answers only the rest. When every row is answered, OUTPUT is rewritten in
INPUT's order. Rows are matched by their ``id`` column, or by their position in INPUT when it
has none.

Engines: ``"ray"`` answers batches on Ray Data (``map_batches`` over ``concurrency`` model
replicas, on this machine or a cluster); ``"local"`` answers them in this process.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batch_rows import DEFAULT_MAX_NEW_TOKENS, BatchPredictor, answer_rows, plain
from .server import DEMO_NAME, batch_generator, check_settings

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def file_format(path: Path) -> str:
    """``"jsonl"`` or ``"parquet"``, by ``path``'s suffix; a ValueError naming the suffixes otherwise."""
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise ValueError(f"{path}: use a .jsonl (one JSON object a line) or .parquet file")
    return found


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ValueError("Parquet files need pyarrow: pip install pyarrow (or 'pio-fvlm[ray]')") from error
    return [{k: plain(v) for k, v in row.items()} for row in pq.read_table(path).to_pylist()]


def _read_jsonl(path: Path, *, partial_last_line: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The rows of a JSONL file and the byte length of its complete lines. With
    ``partial_last_line``, a last line cut short (an interrupted write) is left out, not an error."""
    data = path.read_bytes()
    rows, end, offset = [], 0, 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        offset += len(line) + 1
        if not line.strip():
            end = min(offset, len(data))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if partial_last_line and number == len(lines):
                break
            raise ValueError(f"{path} line {number} is not JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} must be a JSON object with a 'prompt'")
        rows.append(row)
        end = min(offset, len(data))
    return rows, end


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of INPUT, each with its ``id`` (its position when INPUT has no ``id`` column)."""
    if not path.exists():
        raise ValueError(f"no input file {path}")
    rows = _read_parquet(path) if file_format(path) == "parquet" else _read_jsonl(path)[0]
    if not rows:
        raise ValueError(f"{path} has no rows")
    seen: set[Any] = set()
    for position, row in enumerate(rows):
        rows[position] = row = {"id": row.get("id", position), **row}
        key = _key(row["id"])
        if key in seen:
            raise ValueError(f"{path}: the id {row['id']!r} is on more than one row; ids must be unique")
        seen.add(key)
    return rows


def _key(identifier: Any) -> str:
    return json.dumps(identifier, sort_keys=True)


class ResultsFile:
    """OUTPUT: the answers found there from earlier runs, appending new ones, the final rewrite."""

    def __init__(self, path: Path) -> None:
        self.path, self.format = path, file_format(path)
        self.log = path if self.format == "jsonl" else path.with_name(path.name + ".partial.jsonl")
        self.rows: list[dict[str, Any]] = []
        if self.format == "parquet" and path.exists():
            self.rows += _read_parquet(path)
        if self.log.exists():
            logged, complete = _read_jsonl(self.log, partial_last_line=True)
            if complete < self.log.stat().st_size:  # drop a line an interruption cut short
                with open(self.log, "r+b") as handle:
                    handle.truncate(complete)
            self.rows += logged

    def done(self) -> set[str]:
        return {_key(row.get("id")) for row in self.rows}

    def append(self, rows: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows += rows

    def finish(self, order: list[Any]) -> None:
        """Rewrite OUTPUT with one row per id of ``order``, in that order (atomically)."""
        by_id = {_key(row.get("id")): row for row in self.rows}
        rows = [by_id[_key(identifier)] for identifier in order]
        temporary = self.path.with_name(self.path.name + ".tmp")
        if self.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), temporary)
        else:
            temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        os.replace(temporary, self.path)
        if self.log != self.path and self.log.exists():
            self.log.unlink()


@dataclass(frozen=True)
class BatchJob:
    """What to answer with which model, and how (the arguments of :func:`run_batch`)."""

    model: str = DEMO_NAME
    settings: dict[str, Any] | None = None
    engine: str = "local"
    batch_size: int = 8
    concurrency: int = 1
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str | None = None
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 1.0  # Ray also sets the replica's torch threads to this
    address: str | None = None

    def check(self) -> None:
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine must be 'local' or 'ray'; got {self.engine!r}")
        if self.batch_size < 1 or self.concurrency < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size, concurrency and max_new_tokens must be >= 1")
        if self.engine == "local" and self.concurrency != 1:
            raise ValueError("concurrency > 1 runs several model replicas: use the ray engine")
        check_settings(self.model, self.settings)

    def predictor_arguments(self, root: Path) -> dict[str, Any]:
        return dict(model=self.model, settings=self.settings, device=self.device, dtype=self.dtype,
                    attn_implementation=self.attn_implementation, max_new_tokens=self.max_new_tokens, root=str(root))


@dataclass(frozen=True)
class BatchSummary:
    """What a run did: rows in INPUT, answered by earlier runs, answered now, and of those with an error."""

    rows: int
    skipped: int
    answered: int
    errors: int


def run_batch(input_path: str | Path, output_path: str | Path, job: BatchJob, *,
              progress: bool | None = None) -> BatchSummary:
    """Answer the rows of ``input_path`` not yet in ``output_path`` (see the module's docstring).

    ``progress``: show a progress bar (``None``: when standard error is a terminal).
    Image paths in INPUT are read relative to INPUT's folder.
    """
    source, target = Path(input_path), Path(output_path)
    job.check()
    rows = read_rows(source)
    results = ResultsFile(target)
    known = {_key(row["id"]) for row in rows}
    strangers = [row.get("id") for row in results.rows if _key(row.get("id")) not in known]
    if strangers:
        raise ValueError(f"{target} has answers for ids not in {source} (e.g. {strangers[0]!r}): is it the output "
                         "of another input? Give a new OUTPUT path")
    done = results.done()
    pending = [row for row in rows if _key(row["id"]) not in done]
    errors = 0
    if pending:
        from tqdm.auto import tqdm

        with tqdm(total=len(rows), initial=len(rows) - len(pending), unit="row", desc="pio-fvlm batch",
                  disable=(not sys.stderr.isatty()) if progress is None else not progress) as bar:
            answer_batches = _ray_batches if job.engine == "ray" else _local_batches
            for answered in answer_batches(pending, job, source.resolve().parent):
                results.append(answered)
                errors += sum(row["error"] is not None for row in answered)
                bar.update(len(answered))
    results.finish([row["id"] for row in rows])
    return BatchSummary(rows=len(rows), skipped=len(rows) - len(pending), answered=len(pending), errors=errors)


def _local_batches(rows: list[dict[str, Any]], job: BatchJob, root: Path) -> Iterator[list[dict[str, Any]]]:
    generator = batch_generator(job.model, job.settings, device=job.device, dtype=job.dtype,
                                attn_implementation=job.attn_implementation)
    for start in range(0, len(rows), job.batch_size):
        yield answer_rows(generator, rows[start:start + job.batch_size], max_new_tokens=job.max_new_tokens, root=root)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every column of any row, in first-seen order (a missing value reads as None)."""
    return list(dict.fromkeys(name for row in rows for name in row))


def _ray_batches(rows: list[dict[str, Any]], job: BatchJob, root: Path) -> Iterator[list[dict[str, Any]]]:
    """Rows answered on Ray Data, as each block of answers arrives."""
    import logging

    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=job.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's own bar counts rows
    columns = _columns(rows)
    try:
        dataset = ray.data.from_items([{name: row.get(name) for name in columns} for row in rows])
        answers = dataset.map_batches(BatchPredictor, fn_constructor_kwargs=job.predictor_arguments(root),
                                      batch_size=job.batch_size,
                                      compute=ray.data.ActorPoolStrategy(size=job.concurrency),
                                      num_gpus=job.num_gpus_per_replica, num_cpus=job.num_cpus_per_replica,
                                      batch_format="numpy")
        for table in answers.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield table.to_pylist()  # type: ignore[union-attr]  # Arrow keeps a missing count None, numpy NaN
    finally:
        if started:
            ray.shutdown()
