"""Offline batch inference (`pio-fvlm batch`, the Ray Data predictor) on the shipped demo model:
answers equal the batched-generation core's, unreadable rows get an error, an interrupted job
resumes with only the missing rows."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers import SERVING_BUDGET as BUDGET
from pio_fvlm import synthetic as syn
from pio_fvlm.serving import batch_job
from pio_fvlm.serving.batch_job import BatchJob, ResultsFile, run_batch
from pio_fvlm.serving.batch_rows import ANSWER_FIELDS, RowAnswerer, answer_rows, read_image, row_request
from pio_fvlm.serving.client import image_data_url
from pio_fvlm.serving.core import BadRequest, BatchGenerator

SETTINGS = {"budget": BUDGET}


def write_rows(folder, count: int, seed: int = 11, bad: tuple[int, ...] = ()) -> list[dict]:
    """``count`` rows on their own scenes, images saved as PNG files in ``folder``; rows in ``bad``
    name an image file that does not exist."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        objects = syn.random_scene(rng, rng.randint(1, 3))
        Image.fromarray(syn.render(objects, rng)).save(folder / f"scene{i}.png")
        image = f"missing{i}.png" if i in bad else f"scene{i}.png"
        rows.append({"id": f"q{i}", "image": image, "prompt": rng.choice(syn.questions(objects, rng)).question})
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def generator(local):
    return BatchGenerator(*local)


def core_answers(generator, rows, root) -> list[dict]:
    """What the core answers each row alone (the reference of every batch job below)."""
    out = []
    for row in rows:
        (answer,) = generator.generate([row_request(row, 64, root)])
        out.append({"answer": answer.text.strip(), "visual_tokens_kept": answer.visual_kept})
    return out


def test_every_image_form_reads_to_the_same_picture(tmp_path):
    picture = Image.fromarray(syn.render(syn.random_scene(random.Random(1), 2), random.Random(1)))
    picture.save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    forms = ["a.png", str(tmp_path / "a.png"), raw, {"bytes": raw, "path": None}, image_data_url(picture),
             np.asarray(picture)]
    expected = np.asarray(picture.convert("RGB"))
    for form in forms:
        assert np.array_equal(np.asarray(read_image(form, tmp_path)), expected), type(form)


@pytest.mark.parametrize("source, message", [
    ("nothing-here.png", "cannot read the image file"), (b"not an image", "does not decode"),
    (np.zeros((4, 4)), "H x W x 3"), (3.5, "a path, a URL, bytes"), ("ftp://host/a.png", r"must be http\(s\)")])
def test_an_unreadable_image_says_why(tmp_path, source, message):
    with pytest.raises(BadRequest, match=message):
        read_image(source, tmp_path)


def test_batched_rows_equal_each_row_alone_and_a_bad_row_fails_alone(generator, tmp_path):
    rows = write_rows(tmp_path, 6, bad=(2,))
    rows.append({"id": "no-prompt", "image": "scene0.png"})
    answered = answer_rows(generator, rows, root=tmp_path)
    good = [row for i, row in enumerate(rows) if i not in (2, 6)]
    expected = iter(core_answers(generator, good, tmp_path))
    for i, (row, out) in enumerate(zip(rows, answered)):
        assert out["id"] == row["id"] and "image" not in out and set(ANSWER_FIELDS) <= set(out)
        if i == 2:
            assert out["answer"] is None and "cannot read the image file" in out["error"]
        elif i == 6:
            assert out["answer"] is None and "'prompt' string" in out["error"]
        else:
            want = next(expected)
            assert out["error"] is None and out["answer"] == want["answer"] and out["answer"]
            assert out["visual_tokens_seen"] == 576
            assert out["visual_tokens_kept"] == want["visual_tokens_kept"] == BUDGET
            assert out["finish_reason"] == "stop" and out["completion_tokens"] >= 1


def test_a_column_batch_comes_back_as_columns(generator, tmp_path):
    rows = write_rows(tmp_path, 3)
    batch = {"id": np.array([r["id"] for r in rows]), "image": np.array([r["image"] for r in rows], dtype=object),
             "prompt": np.array([r["prompt"] for r in rows])}
    columns = RowAnswerer(generator, root=tmp_path)(batch)
    assert columns["id"] == [r["id"] for r in rows] and "image" not in columns
    assert columns["answer"] == [a["answer"] for a in core_answers(generator, rows, tmp_path)]


def test_a_text_only_row_and_a_row_of_two_images_are_answered(generator, tmp_path):
    rows = write_rows(tmp_path, 2)
    two = {"id": "two", "images": ["scene0.png", "scene1.png"], "prompt": rows[0]["prompt"]}
    text = {"id": "text", "prompt": "how many shapes ?"}
    for out in answer_rows(generator, [two, text], root=tmp_path):
        assert out["error"] is None, out
    assert answer_rows(generator, [text], root=tmp_path)[0]["visual_tokens_seen"] == 0


@pytest.fixture(scope="module")
def job():
    return BatchJob(settings=SETTINGS, engine="local", batch_size=3)


def test_a_job_writes_every_row_in_input_order_and_a_rerun_answers_nothing(generator, tmp_path, job):
    rows = write_rows(tmp_path, 7, bad=(4,))
    write_jsonl(tmp_path / "in.jsonl", rows)
    summary = run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", job)
    assert (summary.rows, summary.skipped, summary.answered, summary.errors) == (7, 0, 7, 1)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert out == answer_rows(generator, rows, root=tmp_path)
    before = (tmp_path / "out.jsonl").read_bytes()
    again = run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", job)
    assert (again.skipped, again.answered) == (7, 0) and (tmp_path / "out.jsonl").read_bytes() == before


def test_an_interrupted_job_resumes_with_only_the_missing_rows(tmp_path, job, monkeypatch):
    rows = write_rows(tmp_path, 8)
    write_jsonl(tmp_path / "in.jsonl", rows)
    run_batch(tmp_path / "in.jsonl", tmp_path / "full.jsonl", job)
    calls: list[list[str]] = []

    def interrupted_after_two_batches(generator, chunk, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append([row["id"] for row in chunk])
        return answer_rows(generator, chunk, **kwargs)

    monkeypatch.setattr(batch_job, "answer_rows", interrupted_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", job)
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [r["id"] for r in rows[:6]]
    with open(tmp_path / "out.jsonl", "a") as handle:
        handle.write('{"id": "q6", "answ')  # a line the interruption cut short
    calls.clear()
    monkeypatch.setattr(batch_job, "answer_rows", lambda generator, chunk, **kwargs: calls.append(
        [row["id"] for row in chunk]) or answer_rows(generator, chunk, **kwargs))
    summary = run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", job)
    assert (summary.skipped, summary.answered) == (6, 2) and calls == [["q6", "q7"]]
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()


def test_parquet_in_and_out_resumes_through_its_partial_log(tmp_path, job):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = write_rows(tmp_path, 5)
    for row in rows:  # images as bytes in the file, as Hugging Face datasets store them
        row["image"] = {"bytes": (tmp_path / row["image"]).read_bytes(), "path": None}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    write_jsonl(tmp_path / "in.jsonl", [{**r, "image": f"scene{i}.png"} for i, r in enumerate(rows)])
    run_batch(tmp_path / "in.jsonl", tmp_path / "reference.jsonl", job)
    reference = read_jsonl(tmp_path / "reference.jsonl")
    partial = tmp_path / "out.parquet.partial.jsonl"
    write_jsonl(partial, reference[:2])
    summary = run_batch(tmp_path / "in.parquet", tmp_path / "out.parquet", job)
    assert (summary.skipped, summary.answered) == (2, 3) and not partial.exists()
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == reference


def test_an_output_of_another_input_is_refused(tmp_path, job):
    rows = write_rows(tmp_path, 2)
    write_jsonl(tmp_path / "in.jsonl", rows)
    write_jsonl(tmp_path / "out.jsonl", [{"id": "elsewhere", "answer": "x"}])
    with pytest.raises(ValueError, match="ids not in"):
        run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", job)
    write_jsonl(tmp_path / "twice.jsonl", [rows[0], rows[0]])
    with pytest.raises(ValueError, match="more than one row"):
        run_batch(tmp_path / "twice.jsonl", tmp_path / "o.jsonl", job)
    with pytest.raises(ValueError, match=".jsonl .* or .parquet"):
        run_batch(tmp_path / "in.jsonl", tmp_path / "out.csv", job)


def test_results_file_keeps_complete_lines_only(tmp_path):
    (tmp_path / "out.jsonl").write_text('{"id": 1}\n{"id": 2')
    results = ResultsFile(tmp_path / "out.jsonl")
    assert results.rows == [{"id": 1}] and (tmp_path / "out.jsonl").read_text() == '{"id": 1}\n'
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        ResultsFile(tmp_path / "bad.jsonl")


def cli(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "pio_fvlm.cli", "batch", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_the_command_killed_mid_run_completes_only_the_missing_rows_when_rerun(tmp_path):
    rows = write_rows(tmp_path, 120)
    write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["in.jsonl", "out.jsonl", "--budget", str(BUDGET), "--engine", "local", "--batch-size", "1"]
    process = cli(*args, cwd=tmp_path)
    deadline = time.monotonic() + 120
    out = tmp_path / "out.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(ResultsFile(out).rows)
    assert 5 <= written < len(rows), f"the kill came after {written} of {len(rows)} rows"
    process = cli(*args, "--no-progress", cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert f"{written} answered before, {len(rows) - written} now" in stdout
    answers = read_jsonl(out)
    assert [r["id"] for r in answers] == [r["id"] for r in rows] and all(r["error"] is None for r in answers)


@pytest.mark.parametrize("args, message", [
    (["--layer", "99"], "layer"), (["--engine", "local", "--concurrency", "2"], "--concurrency need --engine ray"),
    (["--no-pruning", "--budget", "8"], "leave out budget")])
def test_bad_settings_exit_2_before_any_row(tmp_path, args, message):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    process = cli("in.jsonl", "out.jsonl", *args, cwd=tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and message in stderr and not (tmp_path / "out.jsonl").exists()

