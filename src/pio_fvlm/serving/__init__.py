"""Serve a pruned VLM behind an OpenAI-compatible server that batches requests (``pio-fvlm serve``),
and answer files of prompts in batches (``pio-fvlm batch``).

Needs the ``serve`` extra (``pip install 'pio-fvlm[serve]'``); Ray replicas, clusters and Ray Data
need the ``ray`` extra. See ``docs/serving.md``.
"""

from .server import DEMO_NAME, serve

__all__ = ["DEMO_NAME", "serve"]
