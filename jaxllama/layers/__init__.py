"""Stateless building blocks: linear maps with logical axes, RMSNorm, embeddings, RoPE, SwiGLU."""
