"""Tiny random checkpoints saved with a processor, loadable like a real checkpoint.

``tiny_checkpoint(family, folder)`` saves ``tiny_vlm(family)`` with the family's own processor
class (a word-level tokenizer whose special tokens sit at the tiny models' ids, the PIL image
processor, a one-line chat template); ``images_only_processors()`` lets transformers build and load
processors that own a video processor without torchvision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pio_fvlm.compat import video_processor_internals
from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID, tiny_vlm

# What each family's processor writes at the ids the tiny models use: (vision start, vision end,
# image, video). Unused slots get placeholder names.
CHECKPOINT_SPECIAL_TOKENS = {
    "llava": ("<unused1>", "<unused2>", "<image>", "<unused4>"),
    "llava_next": ("<unused1>", "<unused2>", "<image>", "<unused4>"),
    "llava_onevision": ("<unused1>", "<unused2>", "<image>", "<video>"),
    "qwen2_vl": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "qwen2_5_vl": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "qwen3_vl": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "qwen3_vl_moe": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "internvl": ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
}
# The text the chat template writes for one image part (the processor expands it).
CHECKPOINT_IMAGE_MARKUP = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl_moe": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>",
}
# The text the chat template writes for one video part: the Qwen-VL families' processors expand it.
CHECKPOINT_VIDEO_MARKUP = {family: "<|vision_start|><|video_pad|><|vision_end|>"
                           for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")}
CHAT_USER, CHAT_ASSISTANT = "USER:", "ASSISTANT:"  # the chat template's turn markers (words of the vocabulary)
CHECKPOINT_WORDS = 100  # plain words "w0" ... "w99" follow the special tokens and the markers


def checkpoint_chat_template(family: str) -> str:
    """A one-line chat template: ``USER: <image markup> TEXT ASSISTANT:`` (each image part becomes
    the family's markup and a space; each assistant turn `` ASSISTANT: TEXT ``)."""
    markup = CHECKPOINT_IMAGE_MARKUP.get(family, "<image>")
    video = CHECKPOINT_VIDEO_MARKUP.get(family, "<video>")
    return (
        "{%- for message in messages -%}"
        f"{{{{ '{CHAT_USER} ' if message['role'] == 'user' else ' {CHAT_ASSISTANT} ' }}}}"
        "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
        "{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{ '{markup} ' }}}}"
        f"{{%- elif part['type'] == 'video' -%}}{{{{ '{video} ' }}}}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ ' {CHAT_ASSISTANT}' }}}}{{%- endif -%}}"
    )


def _no_video_processor() -> Any:
    """A video processor that handles no videos: it needs no torchvision (the real ones do)."""
    _, VideoProcessorMixin, _ = video_processor_internals()

    class NoVideoProcessor(VideoProcessorMixin):
        """Stands in for the family's video processor: image requests only."""

    return NoVideoProcessor()


def frames_video_processor(model: nn.Module) -> Any:
    """A torch-only stand-in of the Qwen-VL video processor for ``model``'s tower (the real one needs
    torchvision): each video's (T, H, W, 3) frames are resized to 4 x 4 patches of the tower, the
    frame count padded to a multiple of the temporal patch by repeating the last frame, and cut
    into patches in Qwen2-VL's order; it returns ``pixel_values_videos``, ``video_grid_thw`` and
    the frames' metadata (2 frames per second), as the real one does."""
    import numpy as np
    from PIL import Image
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.video_utils import VideoMetadata

    _, VideoProcessorMixin, _ = video_processor_internals()
    vision = model.config.vision_config

    class FramesVideoProcessor(VideoProcessorMixin):
        patch_size, temporal_patch_size, merge_size = (vision.patch_size, vision.temporal_patch_size,
                                                       vision.spatial_merge_size)

        def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
            p, tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
            side = 4 * p
            rows, grids, metadata = [], [], []
            for video in videos:
                frames = [np.asarray(Image.fromarray(frame).resize((side, side), Image.BICUBIC), np.float32)
                          / 127.5 - 1 for frame in video]
                frames += frames[-1:] * (-len(frames) % tp)
                x = torch.tensor(np.stack(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W)
                t, c, h, w = x.shape
                gt, gh, gw = t // tp, h // p, w // p
                x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
                rows.append(x.reshape(gt * gh * gw, c * tp * p * p))
                grids.append([gt, gh, gw])
                metadata.append(VideoMetadata(total_num_frames=len(video), fps=2.0,
                                              frames_indices=list(range(len(video)))))
            return BatchFeature({"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids),
                                 "video_metadata": metadata})

    return FramesVideoProcessor()


@contextmanager
def images_only_processors() -> Iterator[None]:
    """Inside the block, processors that own a video processor (Qwen-VL, LLaVA-OneVision, InternVL)
    can be built and loaded by ``AutoProcessor`` with a stand-in that handles no videos.

    Without torchvision transformers can neither build these processors (checking the video
    processor's class looks it up in a torchvision-only mapping: ``AttributeError: type object
    'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'``) nor load them
    (``AutoVideoProcessor``: ``ValueError: ... requires `torchvision` to be installed``). The block
    lets an image-processor object pass that class check and makes ``AutoVideoProcessor`` return
    the stand-in; tokenizer, image processor and processor class load as for a real checkpoint.
    Used with torchvision too, so that the checkpoints are the same everywhere.
    """
    pu, _, AutoVideoProcessor = video_processor_internals()  # the real class, not a dummy

    base = pu.MODALITY_TO_BASE_CLASS_MAPPING["video_processor"]
    loader = AutoVideoProcessor.__dict__["from_pretrained"]
    pu.MODALITY_TO_BASE_CLASS_MAPPING["video_processor"] = "ImageProcessingMixin"
    AutoVideoProcessor.from_pretrained = classmethod(lambda cls, *args, **kwargs: _no_video_processor())
    try:
        yield
    finally:
        pu.MODALITY_TO_BASE_CLASS_MAPPING["video_processor"] = base
        AutoVideoProcessor.from_pretrained = loader


def _checkpoint_tokenizer(family: str) -> Any:
    """A whitespace word-level tokenizer whose special tokens sit at the tiny models' ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    start, end, image, video = CHECKPOINT_SPECIAL_TOKENS[family]
    fixed = {"<pad>": PAD_TOKEN_ID, start: VISION_START_ID, end: VISION_END_ID, image: IMAGE_TOKEN_ID,
             video: VIDEO_TOKEN_ID}
    names = ["<unk>", CHAT_USER, CHAT_ASSISTANT] + [f"w{i}" for i in range(CHECKPOINT_WORDS)]
    free = (i for i in range(1000) if i not in fixed.values())
    vocab = {**fixed, **{name: next(free) for name in names}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = {"start_image_token": start, "end_image_token": end, "context_image_token": image,
             "video_token": video} if family == "internvl" else {}  # InternVLProcessor reads these attributes
    # right padding, transformers' default: batched generation must set left padding itself
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        padding_side="right", extra_special_tokens=named)
    tokenizer.add_special_tokens({"additional_special_tokens": [start, end, image, video]})
    return tokenizer


def _checkpoint_processor(family: str, model: nn.Module) -> Any:
    """The family's processor (PIL image processor) sized for ``model``'s vision tower."""
    import transformers as tf

    tokenizer = _checkpoint_tokenizer(family)
    vision = model.config.vision_config
    template = checkpoint_chat_template(family)
    pinpoints = getattr(model.config, "image_grid_pinpoints", None)
    if family == "llava":
        side = vision.image_size  # CLIP: resize the short side, centre crop: one view, (side / patch)^2 tokens
        images = tf.CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return tf.LlavaProcessor(images, tokenizer, patch_size=vision.patch_size, chat_template=template,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava_next":  # anyres: a base view plus the crops of the best pinpoint
        side = vision.image_size
        images = tf.LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                               image_grid_pinpoints=pinpoints)
        return tf.LlavaNextProcessor(images, tokenizer, patch_size=vision.patch_size, chat_template=template,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava_onevision":
        side = vision.image_size
        images = tf.LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                    image_grid_pinpoints=pinpoints)
        return tf.LlavaOnevisionProcessor(images, tokenizer, _no_video_processor(), chat_template=template,
                                          num_image_tokens=(side // vision.patch_size) ** 2,
                                          vision_feature_select_strategy="full")
    if family == "internvl":  # tiles of the tower's size (up to 3, plus a thumbnail when more than one)
        side = vision.image_size[0]
        images = tf.GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=True,
                                             min_patches=1, max_patches=3)
        return tf.InternVLProcessor(images, tokenizer, _no_video_processor(), chat_template=template,
                                    image_seq_length=model.config.image_seq_length)
    # Qwen-VL: resized to multiples of patch * merge with 4 x 4 to 8 x 8 patches (4 to 16 tokens);
    # "shortest_edge" / "longest_edge" are the least and most pixels
    unit = vision.patch_size
    mean_std = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family.startswith("qwen3_vl") else {}
    images = tf.Qwen2VLImageProcessorPil(patch_size=unit, merge_size=vision.spatial_merge_size,
                                         temporal_patch_size=vision.temporal_patch_size,
                                         size={"shortest_edge": (4 * unit) ** 2, "longest_edge": (8 * unit) ** 2},
                                         **mean_std)
    cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
           "qwen3_vl": tf.Qwen3VLProcessor, "qwen3_vl_moe": tf.Qwen3VLProcessor}[family]
    return cls(images, tokenizer, _no_video_processor(), chat_template=template)


def tiny_checkpoint(family: str, folder: str | Path, *, num_layers: int = 4, seed: int = 0) -> Path:
    """Saves ``tiny_vlm(family)`` and a matching processor into ``folder`` (created); returns it.

    ``AutoModelForImageTextToText`` and ``AutoProcessor`` load the folder like a real checkpoint
    (load the processor inside :func:`images_only_processors`). The tokenizer splits on
    whitespace: special tokens at the model's ids (:data:`CHECKPOINT_SPECIAL_TOKENS`), ``USER:``,
    ``ASSISTANT:``, words ``w0`` ... ``w99``. The chat template is
    :func:`checkpoint_chat_template`; the PIL image processor gives pixels the tower takes, and
    images of other sizes give other visual-token counts (except LLaVA-1.5: one view). The language
    model's query and key weights are scaled by 10: at the default initialisation every query
    attends almost uniformly, so answers would hardly depend on positions or on the tokens kept.
    """
    folder = Path(folder)
    model = tiny_vlm(family, num_layers=num_layers, seed=seed)
    with torch.no_grad():
        for name, weight in model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(10.0)
    with images_only_processors():
        processor = _checkpoint_processor(family, model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load_checkpoint(folder: str | Path) -> tuple[nn.Module, Any]:
    """The model (in eval mode) and the processor of a folder :func:`tiny_checkpoint` saved, loaded by
    ``AutoModelForImageTextToText`` and ``AutoProcessor`` as a real checkpoint is."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with images_only_processors():
        processor = AutoProcessor.from_pretrained(folder)
    return model, processor
