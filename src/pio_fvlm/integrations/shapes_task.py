"""An offline lmms-eval task on the synthetic shapes questions (``--tasks pio_shapes``).

Writes a task folder for ``lmms-eval --include_path FOLDER``: a YAML, a JSONL of questions
(each with the seed its image is rendered from, so no image files) and the task's Python
functions. It lets a user check an lmms-eval setup end to end with no download, on the
shipped tiny VLM, and it is what the test suite runs lmms-eval's evaluator on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .. import synthetic as syn

TASK = "pio_shapes"

UTILS = '''"""Functions of the pio_shapes lmms-eval task (written by pio_fvlm)."""
import random

from PIL import Image

from pio_fvlm import synthetic


def doc_to_visual(doc):
    rng = random.Random(doc["seed"])
    objects = synthetic.random_scene(rng, doc["n_objects"])
    return [Image.fromarray(synthetic.render(objects, rng))]


def doc_to_text(doc):
    return doc["question"]  # the demo model's chat template adds " answer"


def process_results(doc, results):
    return {"accuracy": float(results[0].strip() == doc["answer"])}
'''


def yaml_text(data_file: Path) -> str:
    return f"""task: "{TASK}"
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data_file}"
test_split: test
output_type: generate_until
doc_to_visual: !function {TASK}_utils.doc_to_visual
doc_to_text: !function {TASK}_utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  until: [";"]
  max_new_tokens: 1
  temperature: 0
  do_sample: false
process_results: !function {TASK}_utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def scene_questions(n: int, seed: int) -> list[dict[str, object]]:
    """``n`` questions, one per scene, types and object counts in rotation (like the held-out
    split of :mod:`pio_fvlm.shapes_vlm`, with its own seeds)."""
    rows = []
    for i in range(n):
        scene_seed = seed * 1_000_003 + i
        n_objects = 1 + i % 4
        rng = random.Random(scene_seed)
        objects = syn.random_scene(rng, n_objects)
        syn.render(objects, rng)  # advance the rng exactly as doc_to_visual does
        by_kind = {qa.kind: qa for qa in syn.questions(objects, rng)}
        qa = by_kind.get(syn.QUESTION_TYPES[i % len(syn.QUESTION_TYPES)]) or next(iter(by_kind.values()))
        rows.append({"seed": scene_seed, "n_objects": n_objects, "kind": qa.kind, "question": qa.question,
                     "answer": qa.answer})
    return rows


def write_shapes_task(folder: str | Path, items: int = 100, seed: int = 5) -> Path:
    """Write the ``pio_shapes`` task into ``folder`` (created); returns the folder."""
    if items < 1:
        raise ValueError(f"items must be >= 1, got {items}")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in scene_questions(items, seed)))
    (folder / f"{TASK}_utils.py").write_text(UTILS)
    (folder / f"{TASK}.yaml").write_text(yaml_text(data))
    return folder
