"""Parity with Hugging Face transformers (float32)."""
