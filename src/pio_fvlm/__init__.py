"""pio_fvlm: PIO-FVLM visual-token pruning for HuggingFace vision-language models.

    model = pio_fvlm.wrap(model, budget=64)   # then model.generate(...) as always
"""

from .api import describe, get_config, is_wrapped, last_selection, pruned, unwrap, wrap
from .config import PruneConfig
from .models import supported_model_types
from .schedules import PRESETS, average_budget, schedule_for
from .select import PioSelector, SelectionRequest, Selector

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "PioSelector",
    "PruneConfig",
    "SelectionRequest",
    "Selector",
    "__version__",
    "average_budget",
    "describe",
    "get_config",
    "is_wrapped",
    "last_selection",
    "pruned",
    "schedule_for",
    "supported_model_types",
    "unwrap",
    "wrap",
]
