"""Every place where pio_fvlm depends on transformers beyond its public model classes.

The library reaches these names only through this module, and :data:`TOUCHPOINTS` lists each
with a check that it is still where the library expects it, so a transformers release that
moves one fails a test that names the version and what moved (``tests/test_compat.py``), and
:func:`check_touchpoints` says the same at run time. A transformers version outside the declared
range gives one warning when a model is wrapped (:func:`warn_if_untested_versions`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The range pyproject.toml declares; CI runs the suite on both ends (see README, "Development").
TRANSFORMERS_RANGE = ("5.20", "6")  # >= first, < second
TORCH_FLOOR = "2.13"

# Decoder-layer modules of the language models the registered families ship with (LLaVA-1.5 and
# NeXT: Llama or Mistral; OneVision and InternVL: Qwen2; the Qwen-VL families their own).
TEXT_MODEL_MODULES = ("llama", "mistral", "qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
LAYER_KEYWORDS = ("hidden_states", "attention_mask", "position_ids", "position_embeddings")
CACHE_KEYWORDS = ("cache", "past_key_values")  # 5.2x calls it `cache`; the old name is still accepted
MASK_KEYWORDS = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function", "attention_mask",
                 "allow_is_causal_skip", "dtype", "config", "use_vmap", "device")
MASKED_BACKENDS = ("eager", "sdpa", "flash_attention_2")
DEEPSTACK_METHOD = "_deepstack_process"  # Qwen3-VL: adds the DeepStack features after layers 0-2
DEEPSTACK_MODELS = (("qwen3_vl", "Qwen3VLTextModel"), ("qwen3_vl_moe", "Qwen3VLMoeTextModel"))


class TransformersMoved(RuntimeError):
    """A transformers internal that pio_fvlm relies on is not where it was."""


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _moved(touchpoint: str, what: str) -> TransformersMoved:
    low, high = TRANSFORMERS_RANGE
    return TransformersMoved(f"transformers {transformers_version()}: {touchpoint}: {what}. pio_fvlm is tested with "
                             f"transformers >={low},<{high}; install a version in that range or report this")


def _modeling(name: str) -> Any:
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


# ---------------------------------------------------------------------- accessors the library uses
def mask_interface() -> tuple[Any, Any]:
    """``(ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function)`` of ``transformers.masking_utils``:
    the pruned layers' masks are built by the model's own mask function for its backend."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    return ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function


def dynamic_cache_class() -> Any:
    """transformers' default per-layer KV cache, the only cache the runtime keeps records for."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache


def layer_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a decoder layer was called with, under either of its keyword names."""
    cache = kwargs.get(CACHE_KEYWORDS[0])
    return cache if cache is not None else kwargs.get(CACHE_KEYWORDS[1])


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (``.cache`` in 5.2x, ``.past_key_values`` before)."""
    cache = getattr(output, CACHE_KEYWORDS[0], None)
    return cache if cache is not None else getattr(output, CACHE_KEYWORDS[1], None)


def forward_cache_keyword(model: Any) -> str:
    """The keyword a model's ``forward`` takes its KV cache by."""
    params = inspect.signature(model.forward).parameters
    return CACHE_KEYWORDS[0] if CACHE_KEYWORDS[0] in params else CACHE_KEYWORDS[1]


def rotary_function(attention: Any) -> Callable[..., Any] | None:
    """``apply_rotary_pos_emb`` of the module that defines ``attention``'s class (the closed-form
    probe recomputes queries and keys with the model's own rotary), or None."""
    module = sys.modules.get(type(attention).__module__)
    return getattr(module, "apply_rotary_pos_emb", None)


def function_parameters(function: Callable[..., Any]) -> list[str]:
    """Parameter names of a model-module function. With the ``kernels`` package installed,
    transformers turns some (``apply_rotary_pos_emb``) into an ``nn.Module`` whose ``forward`` is
    the function, and whose own signature is only ``(*args, **kwargs)``."""
    target = getattr(function, "forward", function) if not inspect.isfunction(function) else function
    return list(inspect.signature(inspect.unwrap(target)).parameters)


def anyres_helpers() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """LLaVA-NeXT's ``(get_anyres_image_grid_shape, unpad_image)``: where each visual token of an
    anyres image lies (pictures, the NeXT encoder mode)."""
    module = _modeling("llava_next")
    return module.get_anyres_image_grid_shape, module.unpad_image


def anyres_patch_count(family: str = "llava_next") -> Callable[..., int]:
    """``image_size_to_num_patches`` of ``family`` ("llava_next" or "llava_onevision"): views of
    one anyres image (the tiny test models and the benchmark's inputs)."""
    return _modeling(family).image_size_to_num_patches  # type: ignore[no-any-return]


def video_processor_internals() -> tuple[Any, Any, Any]:
    """``(processing_utils, VideoProcessorMixin, AutoVideoProcessor)``: what the test models'
    images-only processors stand in for (building Qwen-VL, OneVision and InternVL processors
    without torchvision)."""
    from transformers import processing_utils
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.video_processing_utils import VideoProcessorMixin

    return processing_utils, VideoProcessorMixin, AutoVideoProcessor


# ---------------------------------------------------------------------- the touchpoints and their checks
@dataclass(frozen=True)
class Touchpoint:
    """One dependency on transformers internals: ``name``, what pio_fvlm uses it for, the modules
    that use it, and ``check`` (raises :class:`TransformersMoved` when it moved)."""

    name: str
    purpose: str
    used_in: tuple[str, ...]
    check: Callable[[], None]


def _check_masks() -> None:
    name = "transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS / causal_mask_function"
    try:
        functions, _ = mask_interface()
    except ImportError as error:
        raise _moved(name, f"cannot be imported ({error})") from error
    for backend in MASKED_BACKENDS:
        if backend not in functions:
            raise _moved(name, f"has no mask function for {backend!r}")
        params = inspect.signature(functions[backend]).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        missing = [k for k in MASK_KEYWORDS if k not in params]
        if missing and not takes_any:
            raise _moved(name, f"the {backend!r} mask function no longer takes {missing}")


def _check_cache() -> None:
    try:
        cache = dynamic_cache_class()
    except ImportError as error:
        raise _moved("transformers.cache_utils.DynamicCache", f"cannot be imported ({error})") from error
    for method in ("get_seq_length", "update"):
        if not callable(getattr(cache, method, None)):
            raise _moved("transformers.cache_utils.DynamicCache", f"has no {method}()")


def _check_layer_keywords() -> None:
    for module_name in TEXT_MODEL_MODULES:
        module = _modeling(module_name)
        layers: list[Any] = [obj for name, obj in vars(module).items()
                             if name.endswith("DecoderLayer") and isinstance(obj, type) and "Vision" not in name
                             and obj.__module__ == module.__name__]
        if not layers:
            raise _moved(f"transformers.models.{module_name}", "defines no text decoder layer class")
        for layer in layers:
            params = inspect.signature(layer.forward).parameters
            missing = [k for k in LAYER_KEYWORDS if k not in params]
            if missing or not any(k in params for k in CACHE_KEYWORDS):
                raise _moved(f"{layer.__name__}.forward", f"takes {list(params)[1:]}; pio_fvlm passes "
                             f"{list(LAYER_KEYWORDS)} and the cache as one of {list(CACHE_KEYWORDS)}")


def _check_rotary() -> None:
    for module_name in TEXT_MODEL_MODULES:
        rotary = getattr(_modeling(module_name), "apply_rotary_pos_emb", None)
        if rotary is None:
            raise _moved(f"transformers.models.{module_name}.modeling_{module_name}", "has no apply_rotary_pos_emb")
        params = function_parameters(rotary)
        if params[:4] != ["q", "k", "cos", "sin"] or "unsqueeze_dim" not in params:
            raise _moved(f"{module_name}.apply_rotary_pos_emb", f"takes {params}; expected (q, k, cos, sin, ...)")


def _check_deepstack() -> None:
    for module_name, class_name in DEEPSTACK_MODELS:
        model = getattr(_modeling(module_name), class_name, None)
        method = getattr(model, DEEPSTACK_METHOD, None)
        if method is None:
            raise _moved(f"{class_name}.{DEEPSTACK_METHOD}", "does not exist (the DeepStack features would go to "
                         "dropped tokens' slots)")
        params = list(inspect.signature(method).parameters)
        if params != ["self", "hidden_states", "visual_pos_masks", "visual_embeds"]:
            raise _moved(f"{class_name}.{DEEPSTACK_METHOD}", f"takes {params[1:]}; expected "
                         "(hidden_states, visual_pos_masks, visual_embeds)")


def _check_anyres() -> None:
    try:
        grid_shape, unpad = anyres_helpers()
    except (ImportError, AttributeError) as error:
        raise _moved("llava_next get_anyres_image_grid_shape / unpad_image", f"not found ({error})") from error
    if list(inspect.signature(grid_shape).parameters)[:3] != ["image_size", "grid_pinpoints", "patch_size"]:
        raise _moved("llava_next.get_anyres_image_grid_shape", "changed its arguments")
    if list(inspect.signature(unpad).parameters)[:2] != ["tensor", "original_size"]:
        raise _moved("llava_next.unpad_image", "changed its arguments")


def _check_anyres_patch_count() -> None:
    for family in ("llava_next", "llava_onevision"):
        try:
            count = anyres_patch_count(family)
        except AttributeError as error:
            raise _moved(f"{family}.image_size_to_num_patches", "does not exist") from error
        if function_parameters(count)[:3] != ["image_size", "grid_pinpoints", "patch_size"]:
            raise _moved(f"{family}.image_size_to_num_patches", "changed its arguments")


def _check_video_processor_internals() -> None:
    try:
        processing_utils, _, loader = video_processor_internals()
    except ImportError as error:
        raise _moved("video processor classes", f"cannot be imported ({error})") from error
    mapping = getattr(processing_utils, "MODALITY_TO_BASE_CLASS_MAPPING", None)
    if not isinstance(mapping, dict) or "video_processor" not in mapping:
        raise _moved("processing_utils.MODALITY_TO_BASE_CLASS_MAPPING", "has no 'video_processor' entry")
    if "from_pretrained" not in loader.__dict__:
        raise _moved("AutoVideoProcessor.from_pretrained", "is not defined on the class itself")


def _check_output_cache() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    fields = BaseModelOutputWithPast.__dataclass_fields__
    if not any(k in fields for k in CACHE_KEYWORDS):
        raise _moved("BaseModelOutputWithPast", f"has neither of {list(CACHE_KEYWORDS)}: {list(fields)}")


def _check_attention_setting() -> None:
    from transformers import PretrainedConfig

    if not hasattr(PretrainedConfig(), "_attn_implementation"):
        raise _moved("PretrainedConfig._attn_implementation", "does not exist (the backend of the pruned layers' "
                     "masks is read from it)")


def _check_streamer() -> None:
    try:
        from transformers.generation.streamers import BaseStreamer
    except ImportError as error:
        raise _moved("transformers.generation.streamers.BaseStreamer", f"cannot be imported ({error})") from error
    if not all(callable(getattr(BaseStreamer, m, None)) for m in ("put", "end")):
        raise _moved("BaseStreamer", "has no put() / end()")


TOUCHPOINTS: tuple[Touchpoint, ...] = (
    Touchpoint("mask functions", "the pruned layers' attention masks, in the format of the model's backend",
               ("runtime.masks",), _check_masks),
    Touchpoint("DynamicCache", "the default KV cache, whose per-layer lengths the runtime records",
               ("runtime.call_start", "runtime.first_stage"), _check_cache),
    Touchpoint("decoder layer keywords", "the pruned layers get the shortened hidden states, mask, position ids "
               "and embeddings by these keywords; the probe calls a layer without its cache",
               ("runtime.hooks", "select.saliency"), _check_layer_keywords),
    Touchpoint("apply_rotary_pos_emb", "the closed-form probe recomputes queries and keys with the model's rotary",
               ("select.saliency",), _check_rotary),
    Touchpoint("Qwen3-VL _deepstack_process", "a per-instance stand-in adds DeepStack features to the kept tokens",
               ("models.qwen3_vl",), _check_deepstack),
    Touchpoint("LLaVA-NeXT anyres helpers", "where each visual token of an anyres image lies",
               ("viz", "encoder.next_tiles"), _check_anyres),
    Touchpoint("output cache field", "the benchmark and lmms-eval read the cache of a prefill's output",
               ("bench", "integrations.lmms_eval"), _check_output_cache),
    Touchpoint("config._attn_implementation", "which attention backend the model runs",
               ("runtime.masks",), _check_attention_setting),
    Touchpoint("anyres view count", "views of an anyres image, for the test models and the benchmark's inputs",
               ("bench_models", "tests/tiny_models.py"), _check_anyres_patch_count),
    Touchpoint("video processor classes", "test models' processors built without torchvision",
               ("tests/tiny_checkpoints.py",), _check_video_processor_internals),
    Touchpoint("generate streamer", "the server streams each batched row's text as it is generated",
               ("serving.core",), _check_streamer),
)


def check_touchpoints() -> list[str]:
    """What moved in the installed transformers, one message per touchpoint (empty: nothing)."""
    problems = []
    for touchpoint in TOUCHPOINTS:
        try:
            touchpoint.check()
        except TransformersMoved as moved:
            problems.append(str(moved))
    return problems


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def untested_versions(transformers: str | None = None, torch: str | None = None) -> list[str]:
    """Why the installed (or given) versions are outside what pio_fvlm declares and tests; empty when inside."""
    import torch as torch_module

    transformers = transformers or transformers_version()
    torch = torch or str(torch_module.__version__)
    low, high = TRANSFORMERS_RANGE
    out = []
    if not _version_tuple(low) <= _version_tuple(transformers) < _version_tuple(high):
        out.append(f"transformers {transformers} is outside the tested range >={low},<{high}")
    if _version_tuple(torch) < _version_tuple(TORCH_FLOOR):
        out.append(f"torch {torch} is older than the tested floor {TORCH_FLOOR}")
    return out


_warned = False


def warn_if_untested_versions() -> None:
    """One warning per process when transformers or torch is outside the declared range."""
    global _warned
    if _warned:
        return
    problems = untested_versions()
    if problems:
        _warned = True
        warnings.warn("pio_fvlm: " + "; ".join(problems) + ". It may work, but pruning touches transformers "
                      "internals that move between releases: pio_fvlm.compat.check_touchpoints() lists what moved",
                      stacklevel=3)
