"""The synthetic shapes task: per-patch labels line up with the rendered image."""

import random

import numpy as np

from pio_fvlm import synthetic as syn


def test_owner_map_and_patch_labels_line_up_with_the_image():
    for seed in range(5):
        objects = syn.random_scene(random.Random(seed), 1 + seed % 4)
        image = syn.render(objects, random.Random(100 + seed))
        same, owner = syn.render_with_owner(objects, random.Random(100 + seed))
        assert np.array_equal(image, same)  # the same random draws
        labels = syn.patch_labels(objects, owner)
        assert labels.shape == (3, (syn.SIZE // 14) ** 2)
        grid = labels.reshape(3, syn.SIZE // 14, syn.SIZE // 14)
        for k, o in enumerate(objects):
            painted = owner == k
            assert (image[painted] == syn.COLORS[o.color]).all()
            ys, xs = np.nonzero(painted)
            r, c = int(ys.mean()) // 14, int(xs.mean()) // 14  # the patch at the object's centre
            assert grid[0, r, c] == list(syn.COLORS).index(o.color) + 1
            assert grid[1, r, c] == syn.SHAPES.index(o.shape) + 1
            assert grid[2, r, c] == o.col + 1
        assert (labels[0] > 0).sum() == (labels[2] > 0).sum()
        blank, none = syn.render_with_owner(objects, random.Random(1), blank=True)
        assert (none == -1).all() and not syn.patch_labels(objects, none).any()
