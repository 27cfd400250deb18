"""pio_fvlm.compat: every transformers internal the library relies on is where it expects it, a
moved one fails with the transformers version and what moved, and only compat reaches them."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
import transformers
from torch import nn

import pio_fvlm
from pio_fvlm import compat
from pio_fvlm.select import saliency
from tiny_models import tiny_llava

ROOT = Path(__file__).resolve().parents[1]
BY_NAME = {touchpoint.name: touchpoint for touchpoint in compat.TOUCHPOINTS}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_touchpoint_holds_on_the_installed_transformers(name):
    BY_NAME[name].check()  # raises TransformersMoved naming the version and what moved


def _modeling(name):
    return compat._modeling(name)


def _move_masks(mp):
    from transformers import masking_utils

    mp.setattr(masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS", {"eager": lambda **kw: None})


def _move_cache(mp):
    mp.setattr(compat.dynamic_cache_class(), "get_seq_length", None)


def _move_layer_keywords(mp):
    def forward(self, hidden_states, mask=None, cache=None):
        return hidden_states

    mp.setattr(_modeling("qwen2").Qwen2DecoderLayer, "forward", forward)


def _move_rotary(mp):
    mp.delattr(_modeling("mistral"), "apply_rotary_pos_emb")


def _move_deepstack(mp):
    mp.delattr(_modeling("qwen3_vl_moe").Qwen3VLMoeTextModel, compat.DEEPSTACK_METHOD)


def _move_anyres(mp):
    mp.setattr(_modeling("llava_next"), "unpad_image", lambda image, size: image)


def _move_anyres_count(mp):
    mp.setattr(_modeling("llava_onevision"), "image_size_to_num_patches", lambda size, pinpoints: 1)


def _move_video_processor(mp):
    from transformers import processing_utils

    mp.setattr(processing_utils, "MODALITY_TO_BASE_CLASS_MAPPING", {"image_processor": "ImageProcessingMixin"})


def _move_output_cache(mp):
    from transformers.modeling_outputs import BaseModelOutputWithPast

    mp.setattr(BaseModelOutputWithPast, "__dataclass_fields__", {"last_hidden_state": None})


def _move_attention_setting(mp):
    class Config:
        pass

    mp.setattr(transformers, "PretrainedConfig", Config)


def _move_streamer(mp):
    from transformers.generation.streamers import BaseStreamer

    mp.setattr(BaseStreamer, "put", None)


MOVES = {  # touchpoint -> how a release could move it
    "mask functions": (_move_masks, "no mask function for 'sdpa'"),
    "DynamicCache": (_move_cache, "get_seq_length"),
    "decoder layer keywords": (_move_layer_keywords, "Qwen2DecoderLayer.forward"),
    "apply_rotary_pos_emb": (_move_rotary, "modeling_mistral: has no apply_rotary_pos_emb"),
    "Qwen3-VL _deepstack_process": (_move_deepstack, "Qwen3VLMoeTextModel._deepstack_process"),
    "LLaVA-NeXT anyres helpers": (_move_anyres, "unpad_image"),
    "anyres view count": (_move_anyres_count, "llava_onevision.image_size_to_num_patches"),
    "video processor classes": (_move_video_processor, "MODALITY_TO_BASE_CLASS_MAPPING"),
    "output cache field": (_move_output_cache, "BaseModelOutputWithPast"),
    "config._attn_implementation": (_move_attention_setting, "_attn_implementation"),
    "generate streamer": (_move_streamer, "put()"),
}


def test_every_touchpoint_has_a_move_to_fail_on():
    assert set(MOVES) == set(BY_NAME)


@pytest.mark.parametrize("name", sorted(MOVES))
def test_a_moved_touchpoint_fails_naming_the_version_and_what_moved(name, monkeypatch):
    move, words = MOVES[name]
    move(monkeypatch)
    with pytest.raises(compat.TransformersMoved) as moved:
        BY_NAME[name].check()
    message = str(moved.value)
    assert message.startswith(f"transformers {transformers.__version__}: ")
    assert words in message and ">=5.20,<6" in message
    assert any(message == problem for problem in compat.check_touchpoints())


def test_only_compat_imports_transformers_submodules():
    pattern = re.compile(r"(from transformers\.[\w.]+ import|import transformers\.)")
    offenders = [f"{path.relative_to(ROOT)}:{number}" for path in sorted((ROOT / "src/pio_fvlm").rglob("*.py"))
                 if path.name != "compat.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_declared_ranges_are_the_ones_compat_checks():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    low, high = compat.TRANSFORMERS_RANGE
    assert f"transformers>={low},<{high}" in declared
    assert f"torch>={compat.TORCH_FLOOR}" in declared


@pytest.mark.parametrize("transformers_version, torch_version, problems", [
    ("5.20.0", "2.13.0", 0), ("5.25.0", "2.13.0+cpu", 0), ("5.99.1", "2.15.0", 0),
    ("5.19.2", "2.13.0", 1), ("6.0.0", "2.13.0", 1), ("6.0.0.dev0", "2.13.0", 1), ("5.20.0", "2.12.1", 1),
    ("4.57.6", "2.4.0", 2)])
def test_versions_outside_the_declared_range_are_named(transformers_version, torch_version, problems):
    assert len(compat.untested_versions(transformers_version, torch_version)) == problems


def test_wrap_warns_once_for_an_untested_transformers(monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)
    monkeypatch.setattr(compat, "transformers_version", lambda: "6.1.0")
    with pytest.warns(UserWarning, match=r"transformers 6.1.0 is outside the tested range >=5.20,<6"):
        pio_fvlm.wrap(tiny_llava(), budget=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pio_fvlm.wrap(tiny_llava(), budget=8)


def test_wrap_is_silent_on_the_installed_versions(monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pio_fvlm.wrap(tiny_llava(), budget=8)


def test_rotary_parameters_are_read_through_a_kernels_module_wrapper():
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        return q, k

    class Func(nn.Module):  # what `kernels` makes of a decorated function
        def forward(self, *args, **kwargs):
            return apply_rotary_pos_emb(*args, **kwargs)

    wrapped = Func()
    wrapped.forward = apply_rotary_pos_emb  # type: ignore[method-assign]
    assert compat.function_parameters(wrapped) == ["q", "k", "cos", "sin", "unsqueeze_dim"]
    assert saliency._takes_unsqueeze_dim(wrapped)
    x = torch.randn(1, 3, 2, 4)
    assert torch.equal(saliency._rotate_tokens_major(wrapped, x, x, x), x)
