"""lmms-eval's entry point (group ``lmms_eval.models``): registers ``--model pio_fvlm``.

Kept apart from the model class so that lmms-eval's registry can read it while it is
still importing itself (the class module imports ``lmms_eval.api``).
"""

from __future__ import annotations

from typing import Any


def manifest() -> Any:
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="pio_fvlm", simple_class_path="pio_fvlm.integrations.lmms_eval.PioFvlm")
