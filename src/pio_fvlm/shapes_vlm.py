"""The shipped demo model: where it lives, its prompts, and how it is scored.

``ASSET_DIR`` holds a real ``LlavaForConditionalGeneration`` (CLIP tower at 336 px / patch 14 ->
576 visual tokens, a 4-layer Llama) with an offline word-level tokenizer and a ``LlavaProcessor``
whose chat template builds the prompt it was trained on (``<image> QUESTION answer``); its
generation ends after the one-word answer. It was trained on :mod:`pio_fvlm.synthetic` by
``training/train_tiny_vlm.py`` (not part of the package).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import synthetic as syn

ASSET_DIR = Path(__file__).parent / "assets" / "tiny-llava-shapes"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_TOKEN = "<image>"

N_VISUAL = (syn.SIZE // 14) ** 2

def word_ids() -> dict[str, int]:
    return {w: i for i, w in enumerate(syn.VOCAB)}

def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, 336, 336) normalised like the CLIP processor (images are already 336 x 336)."""
    x = torch.from_numpy(np.stack(images)).float().div(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std

EvalItem = tuple[np.ndarray, list[syn.Obj], syn.QA]

# the training script's validation split (``eval_set(150, seed=VALIDATION_SEED)``): decisions are made
# on it, never on the test split (``eval_set``'s default seed)
VALIDATION_SEED = 777_001

def eval_set(n: int = 300, seed: int = 10_000_019, max_objects: int = 4) -> list[EvalItem]:
    """A held-out split (its own seed): one question per scene, types in rotation."""
    return [item for item, _ in eval_set_with_owners(n, seed, max_objects)]

def eval_set_with_owners(n: int = 300, seed: int = 10_000_019,
                         max_objects: int = 4) -> list[tuple[EvalItem, np.ndarray]]:
    """:func:`eval_set` (the same items) with each scene's (576,) visual-token owners
    (:func:`pio_fvlm.synthetic.patch_owner`: object index under each token, -1 background)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        objects = syn.random_scene(rng, 1 + i % max_objects)
        image, owner = syn.render_with_owner(objects, rng)
        by_kind = {qa.kind: qa for qa in syn.questions(objects, rng)}
        kind = syn.QUESTION_TYPES[i % len(syn.QUESTION_TYPES)]
        qa = by_kind.get(kind) or next(iter(by_kind.values()))
        out.append(((image, objects, qa), syn.patch_owner(owner)))
    return out

def prompt_rows(qas: list[syn.QA]) -> list[list[int]]:
    """Token ids of each question's prompt: the 576 image tokens, then the question."""
    ids = word_ids()
    return [[ids[IMAGE_TOKEN]] * N_VISUAL + [ids[w] for w in syn.qa_text(qa, with_answer=False).split()] for qa in qas]

@torch.no_grad()
def answer_batch(model: Any, images: list[np.ndarray], qas: list[syn.QA]) -> list[str]:
    """Greedy one-word answers (next-token argmax after "... ? answer"), on the model's device and dtype."""
    input_ids, mask = prompt_batch(qas)
    device = model.device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                   pixel_values=pixels(images).to(device, model.dtype), logits_to_keep=1).logits
    return [syn.VOCAB[int(t)] for t in logits[:, -1].argmax(-1)]

def prompt_batch(qas: list[syn.QA]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) input ids and attention mask of the questions' prompts, left-padded (as generate
    wants): row ``i``'s image tokens start at ``L - len(prompt_rows(qas)[i])``."""
    ids = word_ids()
    rows = prompt_rows(qas)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), ids["<pad>"], dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return input_ids, mask

def evaluate(model: Any, split: list[EvalItem], batch: int = 16, blank: bool = False,
             on_batch: Callable[[int, list[EvalItem]], None] | None = None) -> dict[str, float]:
    """Accuracy overall, per question type and per object count. ``blank`` replaces every
    image by background noise (accuracy should fall to the answer prior). ``on_batch(start,
    chunk)`` runs after each batch's forward (e.g. to read ``pio_fvlm.last_selection``)."""
    hits: dict[str, list[int]] = {}
    rng = random.Random(0)
    for start in range(0, len(split), batch):
        chunk = split[start : start + batch]
        images = [syn.render([], rng, blank=True) if blank else img for img, _, _ in chunk]
        answers = answer_batch(model, images, [qa for _, _, qa in chunk])
        if on_batch is not None:
            on_batch(start, chunk)
        for (_, objects, qa), got in zip(chunk, answers):
            ok = int(got == qa.answer)
            for key in ("all", qa.kind, f"objects={len(objects)}"):
                hits.setdefault(key, []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}

def demo_accuracy(model: Any, n: int = 100, budget: int = 64) -> tuple[float, float, float]:
    """Accuracy on the first ``n`` test questions with all tokens, with PIO-FVLM keeping
    ``budget`` visual tokens, and on blank images (the answer prior): what ``pio-fvlm demo``
    prints. The model is left unwrapped."""
    from .api import unwrap, wrap

    split = eval_set(n)
    full = evaluate(model, split)["all"]
    wrap(model, budget=budget)
    try:
        pruned = evaluate(model, split)["all"]
    finally:
        unwrap(model)
    return full, pruned, evaluate(model, split, blank=True)["all"]
