"""The configurations of the real checkpoints the benchmarks build with random weights (no downloads).

Each function returns the ``config.json`` values of one published checkpoint (optionally
shallower); :func:`build_on_device` creates the model's random weights directly on a device, so
a 7B model in bf16 needs no CPU copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
)

# llava-hf/llava-1.5-7b-hf's config.json values: CLIP-L/336 tower and Vicuna-7B language model.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)


def llava15_7b_config(text_layers: int = 32, vision_layers: int = 24) -> LlavaConfig:
    """LLaVA-1.5-7B's configuration (576 visual tokens, 32 x 4096 LM), optionally shallower."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**{**CLIP_L_336, "num_hidden_layers": vision_layers}),
        text_config=LlamaConfig(**{**VICUNA_7B, "num_hidden_layers": text_layers}),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def qwen2_5_vl_7b_config() -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct's configuration (config.json values): a 32-layer window-attention
    tower of width 1280 and a 28 x 3584 Qwen2 LM with 4 key-value heads."""
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                          "rope_theta": 1000000.0}),
        vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


# Qwen2-7B / Qwen2.5-7B widths: the language models of LLaVA-OneVision-7B and InternVL3-8B.
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6)


def llava_onevision_7b_config(text_layers: int = 28, vision_layers: int = 26) -> LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's configuration: SigLIP-so400m at 384 px (27 x 27 = 729
    tokens per view), anyres up to 9 crops, a 28 x 3584 Qwen2 LM; optionally shallower."""
    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=vision_layers, num_attention_heads=16, image_size=384, patch_size=14),
        text_config=dict(model_type="qwen2", **{**QWEN2_7B, "num_hidden_layers": text_layers}, vocab_size=152128,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        image_token_id=151646, video_token_id=151647, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )


def internvl3_8b_config(text_layers: int = 28, vision_layers: int = 24) -> InternVLConfig:
    """OpenGVLab/InternVL3-8B-hf's configuration: InternViT-300M at 448 px, pixel shuffle to 256 tokens
    per tile, a 28 x 3584 Qwen2.5 LM with tied embeddings; optionally shallower."""
    return InternVLConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                           num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", **{**QWEN2_7B, "num_hidden_layers": text_layers}, vocab_size=151674,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}),
        image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


def qwen3_vl_8b_config(text_layers: int = 36, vision_layers: int = 27) -> Any:
    """Qwen/Qwen3-VL-8B-Instruct's configuration: a 27-block tower (patch 16, 2 x 2 merge, DeepStack
    taps at blocks 8, 16, 24) and a 36 x 4096 Qwen3 LM (q/k norms, 8 KV heads, interleaved M-RoPE)."""
    from transformers import Qwen3VLConfig

    taps = [i for i in (8, 16, 24) if i < vision_layers] or [0]
    return Qwen3VLConfig(
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=text_layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                         max_position_embeddings=262144, rope_parameters={
                             "rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                             "rope_theta": 5000000.0}),
        vision_config=dict(depth=vision_layers, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           out_hidden_size=4096, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304, deepstack_visual_indexes=taps),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


def qwen3_vl_30b_a3b_config() -> Any:
    """Qwen/Qwen3-VL-30B-A3B-Instruct's configuration: the same tower, a 48 x 2048 Qwen3-MoE LM
    (128 experts, 8 per token, expert width 768)."""
    from transformers import Qwen3VLMoeConfig

    return Qwen3VLMoeConfig(
        text_config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                         num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                         rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True, "rope_theta": 5000000.0}),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=[8, 16, 24]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


def build_on_device(cls: type[nn.Module], config: object, dtype: torch.dtype, device: str) -> nn.Module:
    """``cls(config)`` in eval mode, its random weights created directly on ``device`` in ``dtype``
    (a 7B model in bf16 on a GPU without a CPU copy; ``"meta"`` for shapes only)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
