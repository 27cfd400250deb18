"""Encoder-side compression for the encoder-involved mode (before the language model)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .qwen_windows import PerSampleBudget, QwenAttentionCapture, QwenWindowSelector, refuse_videos
from .visionzip import ClsAttentionCapture, VisionZipSelector, kept_per_image

ENCODERS = ("visionzip",)
Hooks = list[tuple[nn.Module, Any]]  # (module, forward pre-hook with kwargs)


def install_encoder(model: nn.Module, encoder_budget: int) -> tuple[Any, Hooks, Any]:
    """The layer-0 selector, the pre-hooks it needs on the vision side, and the per-sample
    budget function (visual tokens kept from layer 0 on), for LLaVA-1.5 (VisionZip-style) or
    Qwen2-VL / Qwen2.5-VL (window-local + global). Other models get a clear error."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        return install_qwen_windows(model, encoder_budget)
    if kind != "llava":
        raise ValueError(
            f"encoder='visionzip' is available for LLaVA-1.5, Qwen2-VL and Qwen2.5-VL; {type(model).__name__} "
            f"(model_type {kind!r}) has no encoder of that kind here. Use encoder=None."
        )
    selector, attn, budget = install_visionzip(model, encoder_budget)
    return selector, [(attn, selector.capture.hook)], budget


def install_qwen_windows(model: nn.Module, encoder_budget: int) -> tuple[QwenWindowSelector, Hooks, PerSampleBudget]:
    """Qwen2(.5)-VL: capture in the tower's last full-attention block (see :mod:`.qwen_windows`)."""
    vlm: Any = model
    vc = vlm.config.vision_config
    tower = vlm.model.visual
    full = list(getattr(vc, "fullatt_block_indexes", None) or [])
    block = tower.blocks[max(full) if full else len(tower.blocks) - 1]
    window_size = getattr(vc, "window_size", None) if full else None
    window_merged = window_size // vc.spatial_merge_size // vc.patch_size if window_size else None
    capture = QwenAttentionCapture(vc.spatial_merge_size, window_merged)
    selector = QwenWindowSelector(capture, encoder_budget, vlm.config.image_token_id)
    hooks: Hooks = [(vlm.model, refuse_videos), (tower, capture.tower_hook), (block.attn, capture.attention_hook)]
    return selector, hooks, PerSampleBudget(encoder_budget)


def install_visionzip(model: nn.Module, encoder_budget: int) -> tuple[VisionZipSelector, nn.Module, Any]:
    """For a LLaVA-1.5 model: the layer-0 selector, the vision attention module to hook, and
    the per-sample budget function (visual tokens kept from layer 0 on).

    Raises ValueError for models without a CLIP-style tower whose features come from one layer.
    """
    vlm: Any = model
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
    attn = layers[k - 1].self_attn
    drop_cls = cfg.vision_feature_select_strategy == "default"
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


__all__ = ["ENCODERS", "ClsAttentionCapture", "QwenWindowSelector", "VisionZipSelector", "install_encoder"]
