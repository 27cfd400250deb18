"""Encoder-side compression for the encoder-involved mode (before the language model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .next_tiles import ImageSizesCapture, NextTilesSelector, RecordImageSizes
from .qwen_windows import QwenAttentionCapture, QwenWindowSelector, RefuseVideos
from .visionzip import ClsAttentionCapture, PerSampleBudget, VisionZipSelector, kept_per_image

ENCODERS = ("visionzip",)
Hooks = list[tuple[nn.Module, Any]]  # (module, forward pre-hook with kwargs)


def check_encoder_settings(encoder: object, encoder_budget: object) -> None:
    """Raise a clear error unless ``encoder`` names an encoder mode and ``encoder_budget`` is a count."""
    if encoder is None:
        raise ValueError(f"encoder_budget={encoder_budget!r} needs an encoder mode: pass encoder='visionzip' with it, "
                         f"or leave encoder_budget out")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS} or None; got {encoder!r}")
    if isinstance(encoder_budget, bool) or not isinstance(encoder_budget, int) or encoder_budget < 1:
        raise ValueError(
            f"encoder={encoder!r} needs encoder_budget, an int >= 1 of tokens kept (per image on LLaVA-1.5, "
            f"per sample on Qwen) before the language model (e.g. encoder_budget=128); got {encoder_budget!r}"
        )


@dataclass
class EncoderInstall:
    """What an encoder mode adds to a wrap: the layer-0 selector, its per-sample budget
    function (visual tokens kept from layer 0 on), forward pre-hooks on the vision side, and
    instance-level method stand-ins (module, method name, callable)."""

    selector: Any
    budget: Any
    hooks: Hooks
    method_patches: list[tuple[nn.Module, str, Any]] = field(default_factory=list)


def install_encoder(model: nn.Module, encoder_budget: int) -> EncoderInstall:
    """The encoder mode of its family in :data:`ENCODER_MODES` (LLaVA-1.5 / LLaVA-NeXT: VisionZip-style
    on [CLS] attention; Qwen2-VL / Qwen2.5-VL: window-local + global on the tower's attention), or a
    clear error saying why the family has none (:data:`NO_ENCODER_MODE`)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    install = ENCODER_MODES.get(model_type)
    if install is None:
        why = NO_ENCODER_MODE.get(model_type, "it has no encoder-side score here")
        raise ValueError(f"encoder='visionzip' is not available for {type(model).__name__}: {why}. "
                         f"Use encoder=None (PIO-FVLM inside the language model works as for any family).")
    return install(model, encoder_budget)


def install_llava_visionzip(model: nn.Module, encoder_budget: int) -> EncoderInstall:
    """LLaVA-1.5: VisionZip-style dominant + contextual tokens per image (see :mod:`.visionzip`)."""
    selector, attn, budget = install_visionzip(model, encoder_budget)
    return EncoderInstall(selector, budget, [(attn, selector.capture.hook)])


def install_qwen_windows(model: nn.Module, encoder_budget: int) -> EncoderInstall:
    """Qwen2(.5)-VL: capture in the tower's last full-attention block (see :mod:`.qwen_windows`)."""
    vlm: Any = model
    vc = vlm.config.vision_config
    tower = vlm.model.visual
    full = list(getattr(vc, "fullatt_block_indexes", None) or [])
    block = tower.blocks[max(full) if full else len(tower.blocks) - 1]
    window_size = getattr(vc, "window_size", None) if full else None
    window_merged = window_size // vc.spatial_merge_size // vc.patch_size if window_size else None
    capture = QwenAttentionCapture(vc.spatial_merge_size, window_merged)
    selector = QwenWindowSelector(capture)
    hooks: Hooks = [(vlm.model, RefuseVideos(vlm.config.video_token_id)), (tower, capture.tower_hook),
                    (block.attn, capture.attention_hook)]
    return EncoderInstall(selector, PerSampleBudget(encoder_budget), hooks)


def install_next_tiles(model: nn.Module, encoder_budget: int) -> EncoderInstall:
    """LLaVA-NeXT: [CLS] attention per tile in the feature layer (see :mod:`.next_tiles`)."""
    vlm: Any = model
    cfg = vlm.config
    attn, drop_cls = feature_layer_attention(vlm)
    if not drop_cls:
        raise ValueError("encoder='visionzip' on LLaVA-NeXT needs vision_feature_select_strategy='default'")
    vc = cfg.vision_config
    capture, sizes = ClsAttentionCapture(drop_cls), ImageSizesCapture()
    selector = NextTilesSelector(capture, sizes, cfg.image_grid_pinpoints, vc.image_size,
                                 vc.image_size // vc.patch_size)
    # generate() computes image features through base_model.get_image_features (a method, not a
    # module call) and then drops image_sizes: an instance-level stand-in notes them.
    patch = (vlm.model, "get_image_features", RecordImageSizes(vlm.model, sizes))
    return EncoderInstall(selector, PerSampleBudget(encoder_budget), [(attn, capture.hook)], [patch])


def feature_layer_attention(vlm: Any) -> tuple[nn.Module, bool]:
    """The self-attention of the CLIP layer whose output feeds the projector, and whether the
    features drop [CLS]."""
    cfg = vlm.config
    layer_index = cfg.vision_feature_layer
    if not isinstance(layer_index, int):
        raise ValueError("encoder='visionzip' needs features from a single vision layer (vision_feature_layer int)")
    tower = vlm.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps a CLIPVisionTransformer in some versions
    layers = tower.encoder.layers
    # hidden_states[k] is the output of layer k - 1 (hidden_states[0]: the embeddings)
    k = layer_index % (len(layers) + 1)
    if k == 0:
        raise ValueError("encoder='visionzip' needs features from a transformer layer, not the embeddings")
    return layers[k - 1].self_attn, cfg.vision_feature_select_strategy == "default"


def install_visionzip(model: nn.Module, encoder_budget: int) -> tuple[VisionZipSelector, nn.Module, Any]:
    """For a LLaVA-1.5 model: the layer-0 selector, the vision attention module to hook, and
    the per-sample budget function (visual tokens kept from layer 0 on).

    Raises ValueError for models without a CLIP-style tower whose features come from one layer.
    """
    vlm: Any = model
    cfg = vlm.config
    attn, drop_cls = feature_layer_attention(vlm)
    vc = cfg.vision_config
    per_image = (vc.image_size // vc.patch_size) ** 2 + (0 if drop_cls else 1)
    selector = VisionZipSelector(ClsAttentionCapture(drop_cls), encoder_budget, per_image)
    return selector, attn, PerImageBudget(per_image, kept_per_image(encoder_budget, per_image))


class PerImageBudget:
    """Visual tokens a sample keeps from layer 0 on: ``kept`` per image of ``per_image`` tokens."""

    def __init__(self, per_image: int, kept: int) -> None:
        self.per_image, self.kept = per_image, kept

    def __call__(self, n_visual: int) -> int:
        if n_visual % self.per_image:
            raise ValueError(
                f"encoder mode: a sample has {n_visual} visual tokens, not a multiple of {self.per_image} "
                f"per image; do the image-token counts in input_ids match the images?"
            )
        return (n_visual // self.per_image) * self.kept


__all__ = ["ENCODERS", "ClsAttentionCapture", "QwenWindowSelector", "VisionZipSelector", "check_encoder_settings",
           "install_encoder"]


# The encoder mode of each family (by config.model_type), and why the others have none.
ENCODER_MODES: dict[str, Callable[[nn.Module, int], EncoderInstall]] = {
    "llava": install_llava_visionzip,
    "llava_next": install_next_tiles,
    "qwen2_vl": install_qwen_windows,
    "qwen2_5_vl": install_qwen_windows,
}
_QWEN3_VL = ("the window scores are written for the Qwen2-VL / Qwen2.5-VL towers, and Qwen3-VL's DeepStack "
             "features (added after decoder layers 0-2) would have to be reduced the same way; not covered yet")
NO_ENCODER_MODE: dict[str, str] = {
    "llava_onevision": "its SigLIP tower has no [CLS] token, and the [CLS] attention is what VisionZip ranks "
                       "patches by",
    "qwen3_vl": _QWEN3_VL,
    "qwen3_vl_moe": _QWEN3_VL,
    "internvl": "each token the language model sees merges 2 x 2 tower patches (pixel shuffle) and every image "
                "repeats as a thumbnail tile, so the tower's per-patch [CLS] attention does not rank those "
                "tokens by itself",
}
