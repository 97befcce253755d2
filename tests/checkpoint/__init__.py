"""Checkpoint formats: HF, GGUF, orbax, the convert CLI."""
