"""Serve a pruned VLM behind transformers' OpenAI-compatible server (``pio-fvlm serve``).

Needs the ``serve`` extra: ``pip install 'pio-fvlm[serve]'``. See ``docs/serving.md``.
"""

from .server import DEMO_NAME, serve

__all__ = ["DEMO_NAME", "serve"]
