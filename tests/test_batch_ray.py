"""`pio-fvlm batch` on Ray Data: a real local Ray cluster (started and stopped by the test) with two
model replicas; answers equal the in-process job's, and a job resumed there answers only the
missing rows."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.data", reason="batch inference on Ray needs the ray extra: pip install -e '.[ray]'")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from pio_fvlm.serving.batch_job import BatchJob, run_batch  # noqa: E402
from test_batch_inference import BUDGET, read_jsonl, write_jsonl, write_rows  # noqa: E402


def test_ray_data_job_equals_the_local_job_and_resumes(tmp_path):
    rows = write_rows(tmp_path, 9, bad=(6,))
    write_jsonl(tmp_path / "in.jsonl", rows)
    local = BatchJob(settings={"budget": BUDGET}, engine="local", batch_size=4)
    run_batch(tmp_path / "in.jsonl", tmp_path / "local.jsonl", local)
    reference = read_jsonl(tmp_path / "local.jsonl")

    for row in rows:  # the same rows, images as bytes in a Parquet file
        path = tmp_path / row["image"]
        row["image"] = path.read_bytes() if path.exists() else b"not an image"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    (tmp_path / "out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference[:4]))
    on_ray = BatchJob(settings={"budget": BUDGET}, engine="ray", batch_size=2, concurrency=2)
    summary = run_batch(tmp_path / "in.parquet", tmp_path / "out.jsonl", on_ray)
    assert (summary.skipped, summary.answered, summary.errors) == (4, 5, 1)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in reference]
    assert "does not decode" in out[6]["error"] and out[6]["answer"] is None
    assert out[:6] + out[7:] == reference[:6] + reference[7:]

    import ray

    assert not ray.is_initialized()  # the job stopped the cluster it started
