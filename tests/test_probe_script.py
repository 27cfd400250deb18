"""training/probe_tower_shape.py: the closed-form probe reads a class that is in the features and
not one that is absent, and the oriented-edge stem's filters answer to edges of their orientation."""

from __future__ import annotations

import math

import numpy as np
import torch

import tiny_vlm as tv  # training/, on the test path
from helpers import load_script


def _probe_module():
    return load_script("training/probe_tower_shape.py")


def test_ridge_probe_reads_an_encoded_class_and_not_noise() -> None:
    probe = _probe_module()
    rng = np.random.default_rng(0)
    y, yt = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    noise, noise_t = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    encoded, encoded_t = noise.copy(), noise_t.copy()
    encoded[:, :3] += 3 * np.eye(3)[y]  # the class, one-hot, in the first three dimensions
    encoded_t[:, :3] += 3 * np.eye(3)[yt]
    assert probe.ridge_accuracy((encoded, y), (encoded_t, yt)) > 0.9
    assert probe.ridge_accuracy((noise, y), (noise_t, yt)) < 0.5  # chance is 1/3


def test_oriented_edge_stem_filters_answer_to_their_orientation() -> None:

    model = tv.build_model(vision_layers=1)
    assert tv.oriented_edge_stem(model) == 72
    weight = model.model.vision_tower.embeddings.patch_embedding.weight
    yy, xx = torch.meshgrid(torch.arange(14.0) - 6.5, torch.arange(14.0) - 6.5, indexing="ij")
    for a in range(8):  # a step edge through the patch centre at each of the 8 orientations
        theta = math.pi * a / 8
        step = (xx * math.cos(theta) + yy * math.sin(theta) > 0).float()
        patch = torch.zeros(3, 14, 14)
        patch[1] = step  # in the green channel
        response = (weight[:72] * patch).sum(dim=(1, 2, 3)).abs()
        best = int(response.argmax())
        assert best // 9 == a and best % 3 == 1, (a, best)  # that orientation, the green filter


def test_binding_probe_measures_every_layer_and_splits_colour_questions_by_outcome() -> None:
    from pio_fvlm import shapes_vlm as sv

    binding = load_script("training/probe_binding.py")  # it imports the ridge probe from its neighbour
    model = tv.build_model(vision_width=32, vision_layers=1, text_width=32, text_layers=2).eval()
    model.set_attn_implementation("eager")
    items = sv.eval_set_with_owners(30, seed=5)
    image_id = sv.word_ids()[sv.IMAGE_TOKEN]
    for start, (chunk, image_starts, _) in zip((0, 24), binding.forward_in_chunks(model, items)):
        input_ids, _ = sv.prompt_batch([qa for (_, _, qa), _ in chunk])
        assert len(chunk) == (24 if start == 0 else 6)
        for row, at in zip(input_ids, image_starts):  # each row's 576 image tokens start there
            assert (row[at:at + sv.N_VISUAL] == image_id).all() and (at == 0 or row[at - 1] != image_id)
    shape = binding.per_patch_shape(model, n_scenes=24)
    assert len(shape) == 2 and all(0.0 <= acc <= 1.0 for acc in shape)
    split = binding.colour_question_attention(model, n=60)
    expected = sum(item[2].kind == "color" and len(item[1]) > 1 for item in sv.eval_set(60, seed=sv.VALIDATION_SEED))
    assert expected > 0 and sum(entry["count"] for entry in split.values()) == expected
    for entry in split.values():
        assert entry["named"].shape == entry["others"].shape == (2, 4)  # layers x heads
        total = entry["named"] + entry["others"]
        assert (entry["named"] > 0).all() and (total <= 1 + 1e-5).all()
    assert split.get(True, {"in scene": 0, "count": 0})["in scene"] == split.get(True, {"count": 0})["count"]
