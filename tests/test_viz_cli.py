"""Kept-token pictures and the pio-fvlm command (run on a tiny model saved to a folder; demo on
the shipped model)."""

import numpy as np
import pytest
import torch

import tiny_vlm as tv  # training/, on the test path
from pio_fvlm import cli
from pio_fvlm import shapes_vlm as sv
from pio_fvlm import synthetic as syn
from pio_fvlm.viz import draw_kept, kept_grids, side_by_side


def test_kept_grids_and_drawing():
    ids = torch.tensor([5, 6] + [3] * 16 + [3] * 16 + [9])  # two 4 x 4 images
    kept = torch.tensor([2, 7, 18 + 15])
    grids = kept_grids(kept, ids, 3, tokens_per_image=16)
    assert len(grids) == 2
    assert grids[0].nonzero()[0].tolist() == [0, 1] and grids[0].nonzero()[1].tolist() == [0, 1]
    assert grids[1][3, 3] and grids[1].sum() == 1
    image = np.full((40, 60, 3), 200, dtype=np.uint8)  # not square: centre-cropped view
    picture = np.asarray(draw_kept(image, grids[0], size=32))
    assert picture.shape == (32, 32, 3)
    assert picture[4, 4].mean() > 150  # inside a kept patch (0, 0): bright
    assert picture[20, 20].mean() < 80  # a dropped patch: darkened
    assert side_by_side([draw_kept(image, g, size=32) for g in grids]).size == (72, 32)
    with pytest.raises(ValueError, match="not an image token"):
        kept_grids(torch.tensor([0]), ids, 3, tokens_per_image=16)
    with pytest.raises(ValueError, match="square number"):
        kept_grids(kept, ids, 3, tokens_per_image=15)


def test_run_command_on_a_local_folder(tmp_path, capsys):
    model, processor = tv.build_model(), tv.build_processor()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    rng = __import__("random").Random(0)
    from PIL import Image

    Image.fromarray(syn.render(syn.random_scene(rng, 2), rng)).save(tmp_path / "x.png")
    code = cli.main(["run", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"),
                     "--prompt", "how many shapes ? answer", "--budget", "32", "--max-new-tokens", "2",
                     "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "visual tokens kept: 32 of 576" in out
    assert "[all tokens] prefill" in out and "[pruned] prefill" in out


@pytest.mark.skipif(not (sv.ASSET_DIR / "model.safetensors").exists(), reason="shipped model missing")
def test_demo_runs_offline(tmp_path, capsys):
    code = cli.main(["demo", "--eval", "0", "--out", str(tmp_path / "demo.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert "question" in out and "64 kept" in out
    from PIL import Image

    picture = Image.open(tmp_path / "demo.png")
    assert picture.width == 336 * 2 + 8 and picture.height > 336  # scene, kept tokens, then the caption band
    caption = picture.crop((0, 336, picture.width, picture.height)).convert("L")
    assert caption.getextrema()[0] < 100  # the band holds text (question, answers, budget, legend)


def test_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main(["frobnicate"]) == 2
    assert "demo" in capsys.readouterr().out


def test_shapes_task_is_consistent():
    rng = __import__("random").Random(5)
    for _ in range(50):
        objects = syn.random_scene(rng, rng.randint(1, 4))
        for qa in syn.questions(objects, rng):
            assert qa.answer in syn.VOCAB and all(w in syn.VOCAB for w in qa.question.split())
    batch = tv.training_batch(rng, 2, 2)
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"] != -100).sum() == 16
    # every labelled position holds its answer word right after "answer"
    ids = sv.word_ids()
    pos = (batch["labels"] != -100).nonzero()
    assert all(int(batch["input_ids"][b, t - 1]) == ids["answer"] for b, t in pos.tolist())
    assert all(int(batch["input_ids"][b, t]) == int(batch["labels"][b, t]) for b, t in pos.tolist())
