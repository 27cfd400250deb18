"""lmms-eval drives a wrapped model: the ``pio_fvlm`` model is registered by entry point, its
answers equal the wrapped model's own, and lmms-eval's evaluator runs a local task end to end
(no download) with the accuracy our own scorer gives on the same questions."""

import random

import numpy as np
import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="install the [lmms] extra (CI does)")

from pio_fvlm import is_wrapped, last_selection, wrap  # noqa: E402
from pio_fvlm import shapes_vlm as sv  # noqa: E402
from pio_fvlm import synthetic as syn  # noqa: E402
from pio_fvlm.integrations.lmms_eval import PioFvlm, requests_for  # noqa: E402
from pio_fvlm.integrations.shapes_task import scene_questions, write_shapes_task  # noqa: E402

BUDGET = 16


def _render(doc):
    from PIL import Image

    rng = random.Random(doc["seed"])
    return [Image.fromarray(syn.render(syn.random_scene(rng, doc["n_objects"]), rng))]


def _direct_answers(rows, budget):
    """The same questions through the model wrapped by hand, one at a time."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(sv.ASSET_DIR).eval()
    if budget is not None:
        wrap(model, budget=budget)
    out = []
    for row in rows:
        image = np.asarray(_render(row)[0])
        qa = syn.QA(row["kind"], row["question"], row["answer"])
        out.append(sv.answer_batch(model, [image], [qa])[0])
    return out


@pytest.fixture(scope="module")
def rows():
    return scene_questions(10, seed=11)


def test_registered_by_entry_point():
    from lmms_eval.models import get_model

    assert get_model("pio_fvlm") is PioFvlm


def test_unknown_model_args_are_refused():
    with pytest.raises(ValueError, match="unknown --model_args"):
        PioFvlm(pretrained=str(sv.ASSET_DIR), budjet=64)


@pytest.mark.parametrize("prune", [True, False])
def test_generate_until_batched_equals_the_wrapped_model(rows, prune):
    lm = PioFvlm(pretrained=str(sv.ASSET_DIR), budget=BUDGET, prune=prune, batch_size=4, device="cpu")
    items = [(row["question"], {"until": [";"], "max_new_tokens": 1}, row) for row in rows]
    requests, lm.task_dict = requests_for("generate_until", items, _render)
    got = lm.generate_until(requests)
    assert got == _direct_answers(rows, BUDGET if prune else None)
    assert is_wrapped(lm.model) == prune
    if prune:  # the last batch (2 rows: 10 = 4 + 4 + 2) kept exactly the budget
        assert [len(row) for row in last_selection(lm.model)] == [BUDGET, BUDGET]


def test_loglikelihood_chooses_tokens_from_the_prompt_only(rows):
    lm = PioFvlm(pretrained=str(sv.ASSET_DIR), budget=BUDGET, device="cpu")
    row = rows[0]
    context = row["question"]
    inputs = lm.encode([lm.prompt(context, 1)], _render(row))
    target = lm.tokenizer(f"{row['answer']} ;", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        lm.model(**inputs)
    prompt_selection = last_selection(lm.model)[0].tolist()
    logprob, _ = lm.score_continuation(inputs, target)
    assert last_selection(lm.model)[0].tolist() == prompt_selection

    # Unpruned, the two-step score (prompt, then continuation on the cache) is the plain one.
    lm.set_pruning(False)
    full_logprob, _ = lm.score_continuation(inputs, target)
    ids = torch.cat([inputs["input_ids"], target], 1)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                          pixel_values=inputs["pixel_values"]).logits
    n = target.shape[1]
    want = logits[0, -n - 1:-1].log_softmax(-1).gather(-1, target[0].unsqueeze(-1)).sum()
    assert full_logprob == pytest.approx(float(want), abs=1e-4)
    assert logprob != pytest.approx(full_logprob, abs=1e-6)  # pruning did act on the scored prompt

    items = [(context, f"{row['answer']} ;", row)]
    requests, lm.task_dict = requests_for("loglikelihood", items, _render)
    assert lm.loglikelihood(requests)[0][0] == pytest.approx(full_logprob, abs=1e-5)


def test_lmms_eval_evaluator_end_to_end(tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = write_shapes_task(tmp_path / "task", items=8, seed=11)
    out = simple_evaluate(model="pio_fvlm", model_args=f"pretrained={sv.ASSET_DIR},budget={BUDGET},device=cpu",
                          tasks=["pio_shapes"], batch_size=4, task_manager=TaskManager(include_path=str(folder)),
                          log_samples=True, bootstrap_iters=0)
    accuracy = out["results"]["pio_shapes"]["accuracy,none"]
    rows = scene_questions(8, seed=11)
    direct = _direct_answers(rows, BUDGET)
    assert accuracy == pytest.approx(np.mean([a == r["answer"] for a, r in zip(direct, rows)]))
    answers = [s["filtered_resps"][0] for s in sorted(out["samples"]["pio_shapes"], key=lambda s: s["doc_id"])]
    assert answers == direct


def _lmms_eval_answers(command: list[str], folder, out, env) -> dict[int, str]:
    """Run an lmms-eval command line on the offline task; its answers by document."""
    import glob
    import json
    import subprocess

    args = ["-m", "lmms_eval", "--model", "pio_fvlm", "--model_args",
            f"pretrained={sv.ASSET_DIR},budget={BUDGET},device=cpu", "--include_path", str(folder),
            "--tasks", "pio_shapes", "--batch_size", "2", "--log_samples", "--output_path", str(out)]
    run = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (samples,) = glob.glob(str(out / "*" / "*samples_pio_shapes.jsonl"))
    rows = [json.loads(line) for line in open(samples)]
    return {row["doc_id"]: row["filtered_resps"] for row in rows}, run.stdout + run.stderr


@pytest.mark.slow
def test_two_processes_shard_the_requests_and_answer_as_one(tmp_path):
    """Data parallel on CPU (torchrun with ACCELERATE_USE_CPU: two ranks, each half of the
    requests) gives the answers of one process; on GPUs `accelerate launch` does the same."""
    import os
    import sys

    folder = write_shapes_task(tmp_path / "task", items=8, seed=13)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "true"}
    one, _ = _lmms_eval_answers([sys.executable], folder, tmp_path / "one", env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two, log = _lmms_eval_answers(torchrun, folder, tmp_path / "two", env)
    assert "on rank 1" in log  # the second process really ran
    assert two == one and len(one) == 8
