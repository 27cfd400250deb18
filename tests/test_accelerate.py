"""Models loaded with accelerate device maps (with CPU / disk offload hooks) wrap and run the same."""

import warnings

import pytest
import torch

import pio_fvlm
from helpers import standard_batch
from tiny_models import FAMILIES, tiny_vlm

GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[0, 1, 2, 3, 4])


def offload_map(model) -> dict[str, str]:
    """Everything on the CPU but decoder layers 2 and 3 (the prune layer itself) on disk."""
    device_map = {f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "language_model"}
    device_map |= {f"model.{name}": "cpu" for name, _ in model.model.named_parameters(recurse=False)}  # newline
    lm = model.model.language_model
    device_map |= {f"model.language_model.{name}": "cpu" for name, _ in lm.named_children() if name != "layers"}
    device_map |= {f"model.language_model.layers.{i}": "disk" if i >= 2 else "cpu" for i in range(len(lm.layers))}
    device_map["lm_head"] = "cpu"
    return device_map


@pytest.mark.parametrize("family", FAMILIES)
def test_device_map_with_disk_offload(tmp_path, family):
    model = tiny_vlm(family, seed=41)
    model.save_pretrained(tmp_path / "m")
    inputs = standard_batch(model)
    pio_fvlm.wrap(model, budget=4, layer=2)
    want = model.generate(**inputs, **GEN)
    want_kept = [k.tolist() for k in pio_fvlm.last_selection(model)]

    with warnings.catch_warnings():  # accelerate warns that a bare parameter's key names no submodule, then uses it
        warnings.filterwarnings("ignore", message="The following device_map keys do not match")
        offloaded = type(model).from_pretrained(
            tmp_path / "m", device_map=offload_map(model), offload_folder=str(tmp_path / "offload")
        ).eval()
    assert any(hasattr(m, "_hf_hook") for m in offloaded.modules())  # accelerate's hooks are in place
    pio_fvlm.wrap(offloaded, budget=4, layer=2)
    got = offloaded.generate(**inputs, **GEN)
    assert [k.tolist() for k in pio_fvlm.last_selection(offloaded)] == want_kept
    assert torch.equal(got, want)
    pio_fvlm.unwrap(offloaded)
