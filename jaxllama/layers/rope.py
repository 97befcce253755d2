"""Rotary position embeddings (HF rotate-half layout) with every scaling type of METHODS section 2.

`rope_frequencies` returns (inv_freq [R/2], attention_factor). Types whose frequencies depend on the
sequence length (dynamic NTK, longrope) take `seq_len`, which may be a traced scalar: the largest
position of the call plus one, as transformers computes it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxllama.config import RopeConfig


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    return int(head_dim * rope.partial_rotary_factor)


def _default_inv_freq(base, dim: int):
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def _yarn(rope: RopeConfig, dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    base = rope.theta
    lo_pos = rope.original_max_position_embeddings or max_pos
    factor = rope.factor

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rot):
        return dim * math.log(lo_pos / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrap = _default_inv_freq(base, dim)
    interp = extrap / factor
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return (interp * (1 - keep) + extrap * keep).astype(np.float32), float(attention_factor)


def _llama3(rope: RopeConfig, dim: int) -> np.ndarray:
    inv = _default_inv_freq(rope.theta, dim)
    lo_pos = rope.original_max_position_embeddings
    low_wl, high_wl = lo_pos / rope.low_freq_factor, lo_pos / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
    smooth = (lo_pos / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int,
                     seq_len=None):
    """inv_freq [R/2] (float32; a jnp array when it depends on a traced `seq_len`) and the factor
    that multiplies cos and sin, for a head of `head_dim` (R = its rotary part)."""
    return frequencies(rope, rotary_dim(rope, head_dim), max_position_embeddings, seq_len)


def frequencies(rope: RopeConfig, dim: int, max_position_embeddings: int, seq_len=None):
    """inv_freq [dim/2] and the cos/sin factor for `dim` rotary dims."""
    t = rope.type
    if t == "default":
        return _default_inv_freq(rope.theta, dim), 1.0
    if t == "linear":
        return _default_inv_freq(rope.theta, dim) / rope.factor, 1.0
    if t == "llama3":
        return _llama3(rope, dim), 1.0
    if t == "yarn":
        return _yarn(rope, dim, max_position_embeddings)
    if t == "dynamic":
        # transformers uses max_position_embeddings as the original length for dynamic NTK.
        lo_pos = max_position_embeddings
        length = jnp.maximum(jnp.asarray(lo_pos if seq_len is None else seq_len, jnp.float32), lo_pos)
        base = rope.theta * ((rope.factor * length / lo_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)), 1.0
    if t == "longrope":
        lo_pos = rope.original_max_position_embeddings or max_position_embeddings
        factor = rope.factor if rope.factor != 1.0 else max_position_embeddings / lo_pos
        af = rope.attention_factor
        if af is None:
            af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(lo_pos))
        shape = np.arange(0, dim, 2, dtype=np.float32) / dim
        short = 1.0 / (np.asarray(rope.short_factor, np.float32) * rope.theta ** shape)
        long = 1.0 / (np.asarray(rope.long_factor, np.float32) * rope.theta ** shape)
        if seq_len is None:
            return short, float(af)
        return jnp.where(jnp.asarray(seq_len) > lo_pos, long, short), float(af)
    raise ValueError(f"unknown rope type {t!r}")


def rope_for(rope: RopeConfig, dim: int, context_length: int, positions):
    """cos, sin [B T R] (R = `dim` rotary dims) for integer positions [B T].

    `context_length` is the model's `max_position_embeddings`, the length yarn, dynamic NTK and
    longrope scale against; dynamic NTK and longrope also see this call's largest position + 1,
    as transformers computes them. Each mixer passes its own RoPE config and rotary dim, so a kind
    with its own RoPE (MLA's rope part) or none (Mamba) needs nothing from the others.
    """
    seq_len = jnp.max(positions) + 1 if rope.type in ("dynamic", "longrope") else None
    inv_freq, factor = frequencies(rope, dim, context_length, seq_len)
    return rope_cos_sin(positions, inv_freq, factor)


def rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope_cos_sin(positions, inv_freq, attention_factor: float = 1.0):
    """cos, sin [B T R] in float32 for integer positions [B T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B T R/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B T R]
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x, cos, sin):
    """Rotate x [B T N H] by cos/sin [B T R]; dims past R pass through (partial rotary)."""
    r = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return jnp.concatenate([rot * cos + rotate_half(rot) * sin, rest], axis=-1)


def apply_rope_interleaved(x, cos, sin):
    """Rotate x [B T N R] in adjacent pairs (x[2i], x[2i+1]) by cos/sin [B T R] (the rotate-half
    layout of `rope_cos_sin`: angle i at i and i + R/2): DeepSeek's layout, the complex product
    (x[2i] + i x[2i+1]) e^{i pos theta_i}. The output stays interleaved, so a checkpoint's rows
    are used as stored; only dot products of rotated vectors are ever read."""
    half = cos.shape[-1] // 2
    c = cos[:, :, None, :half].astype(x.dtype)  # [B T 1 R/2]
    s = sin[:, :, None, :half].astype(x.dtype)
    pairs = x.reshape(x.shape[:-1] + (half, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([even * c - odd * s, odd * c + even * s], axis=-1)
    return out.reshape(x.shape)
