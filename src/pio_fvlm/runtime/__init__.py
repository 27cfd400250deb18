"""Moving data: hooks, per-call plans, masks, KV-cache records, re-expansion."""

from .hooks import Runtime, RuntimeInfo

__all__ = ["Runtime", "RuntimeInfo"]
