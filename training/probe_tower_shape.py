"""How much shape a tiny CLIP tower's features hold, read by a closed-form linear probe.

    python training/probe_tower_shape.py                 # fresh towers (random / oriented-edge stem), ~3 min
    python training/probe_tower_shape.py --model src/pio_fvlm/assets/tiny-llava-shapes   # a trained tower too

A diagnostic for the one-run training recipe (docs/quality.md, "Why a fresh tower is slow to see
shape"): for every object of 400 training and 200 held-out scenes, the features of the object's
patches are averaged (pooled per object), and a ridge classifier fitted in closed form reads the
object's shape off them. No SGD is involved, so the numbers say what the features hold, not how
well an optimiser finds it. Features probed: the patch embeddings (signed, and rectified with
``abs``: what a first nonlinearity could make of them), the tower's output, the projector's output.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

import tiny_vlm as tv
from pio_fvlm import shapes_vlm as sv
from pio_fvlm import synthetic as syn

WHERE = ("patch embedding", "|patch embedding|", "tower output", "projector output")


def scenes(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int]]]:
    """n images, their (576,) patch owners (object index or -1), and each object's shape index."""
    rng = random.Random(seed)
    images, owners, shapes = [], [], []
    for _ in range(n):
        objects = syn.random_scene(rng, rng.randint(1, 4))
        image, owner = syn.render_with_owner(objects, rng)
        images.append(image)
        owners.append(syn.patch_owner(owner))
        shapes.append([syn.SHAPES.index(o.shape) for o in objects])
    return images, owners, shapes


@torch.no_grad()
def patch_features(model, pixel_values: torch.Tensor, where: str) -> torch.Tensor:
    """(B, 576, D) features of each patch at ``where`` (one of WHERE)."""
    tower = model.model.vision_tower
    if where in WHERE[:2]:
        f = tower.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return f.abs() if where.startswith("|") else f
    if where == "tower output":
        return tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
    return torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))


def pooled(model, data, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(objects, D) mean feature over each object's patches, and (objects,) shape labels."""
    images, owners, shapes = data
    xs, ys = [], []
    for start in range(0, len(images), 25):
        f = patch_features(model, sv.pixels(images[start:start + 25]), where)
        for b in range(f.shape[0]):
            for k, shape in enumerate(shapes[start + b]):
                on = torch.from_numpy(owners[start + b] == k)
                if on.any():
                    xs.append(f[b][on].mean(0).numpy())
                    ys.append(shape)
    return np.array(xs), np.array(ys)


def ridge_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                   lam: float = 1e-2) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier on standardised features."""
    (x, y), (xt, yt) = train, test
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a = np.c_[(x - mu) / sd, np.ones(len(x))]
    at = np.c_[(xt - mu) / sd, np.ones(len(xt))]
    w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ np.eye(len(syn.SHAPES))[y])
    return float((np.argmax(at @ w, 1) == yt).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="also probe this trained checkpoint (repeatable)")
    p.add_argument("--position-boost", type=float, default=6.0, help="as the training script's flag (0 = none)")
    args = p.parse_args()
    train, test = scenes(400, seed=1), scenes(200, seed=2)
    majority = np.bincount(np.array([s for row in test[2] for s in row])).max() / sum(map(len, test[2]))
    print(f"majority class on the held-out objects: {majority:.3f}")
    towers: list[tuple[str, object]] = []
    for stem in (False, True):
        model = tv.build_model(vision_layers=4)
        if stem:
            tv.oriented_edge_stem(model)
        if args.position_boost:
            tv.boost_patch_positions(model, args.position_boost)
        towers.append((f"fresh, {'oriented-edge stem' if stem else 'random patch filters'}", model))
    if args.model:
        from transformers import LlavaForConditionalGeneration

        towers += [(path, LlavaForConditionalGeneration.from_pretrained(path)) for path in args.model]
    for name, model in towers:
        model.eval()
        row = ", ".join(f"{where} {ridge_accuracy(pooled(model, train, where), pooled(model, test, where)):.3f}"
                        for where in WHERE)
        print(f"{name}: {row}", flush=True)


if __name__ == "__main__":
    main()
