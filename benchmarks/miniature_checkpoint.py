"""A servable checkpoint of the 32-layer LLaVA-1.5 miniature (random weights, no downloads).

The miniature (``pio_fvlm.bench_models.miniature_llava``: LLaVA-1.5-7B's depth and proportions,
8x narrower, 576 visual tokens from a 336 px CLIP tower) saved with the demo model's processor
(the same 336 px CLIP preprocessing and ``<image>`` token), so ``pio-fvlm serve`` and
``pio-fvlm batch`` load it like any checkpoint. Its generation config has no end token, so every
answer runs to ``max_tokens``: each request costs the same.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

MINIATURE = "llava-1.5-miniature"  # the --model name the load benchmarks take for it


def save_miniature_llava(folder: str | Path | None = None) -> Path:
    """Write the miniature and its processor to ``folder`` (default: one in the temporary
    directory, shared by the benchmarks) once: an existing checkpoint is kept."""
    from transformers import AutoProcessor

    from pio_fvlm.bench_models import miniature_llava
    from pio_fvlm.shapes_vlm import ASSET_DIR

    folder = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "pio-fvlm-llava-1.5-miniature"
    if (folder / "config.json").exists():
        return folder
    processor = AutoProcessor.from_pretrained(ASSET_DIR)
    model = miniature_llava(num_layers=32)
    model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
