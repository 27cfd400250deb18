"""Moving data: hooks, per-call plans, masks, KV-cache records, re-expansion."""

from .hooks import Runtime

__all__ = ["Runtime"]
