"""Adapters that let other tools drive a wrapped model (lmms-eval)."""
