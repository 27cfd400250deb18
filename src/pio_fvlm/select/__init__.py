"""The method itself, with no HuggingFace knowledge: tensors in, token choices out."""

from .nms import greedy_nms_keep, select_with_nms
from .saliency import ProbeInputs, ProbeModules, fast_saliency, full_layer_saliency, proxy_query_positions
from .selector import PioSelector, SelectionRequest, Selector

__all__ = [
    "PioSelector",
    "ProbeInputs",
    "ProbeModules",
    "SelectionRequest",
    "Selector",
    "fast_saliency",
    "full_layer_saliency",
    "greedy_nms_keep",
    "proxy_query_positions",
    "select_with_nms",
]
