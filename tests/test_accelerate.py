"""Models loaded with accelerate device maps (with CPU / disk offload hooks) wrap and run the same."""

import torch
from transformers import LlavaForConditionalGeneration

import pio_fvlm
from conftest import standard_batch
from pio_fvlm.testing import tiny_llava

GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[0, 1, 2, 3, 4])


def test_device_map_with_disk_offload(tmp_path):
    model = tiny_llava(seed=41)
    model.save_pretrained(tmp_path / "m")
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=4, layer=2)
    want = model.generate(**inputs, **GEN)
    want_kept = [k.tolist() for k in pio_fvlm.last_selection(model)]

    device_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "cpu",
        "model.language_model.layers.2": "disk",  # the prune layer itself lives on disk
        "model.language_model.layers.3": "disk",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "m", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert any(hasattr(m, "_hf_hook") for m in offloaded.modules())  # accelerate's hooks are in place
    pio_fvlm.wrap(offloaded, budget=4, layer=2)
    got = offloaded.generate(**inputs, **GEN)
    assert [k.tolist() for k in pio_fvlm.last_selection(offloaded)] == want_kept
    assert torch.equal(got, want)
    pio_fvlm.unwrap(offloaded)
