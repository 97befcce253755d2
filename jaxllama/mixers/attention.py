"""Dense GQA attention with RoPE, and its preallocated KV cache.

One code path for training (`cache=None`), chunked prefill and one-token decode: with a cache the
call writes its T new keys/values at `cache.length` and attends over all S slots; slots not yet
written (and padding) carry segment id 0 and are masked.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxllama.config import AttentionConfig, KernelConfig
from jaxllama.kernels.flash_attention.api import Mask, attend
from jaxllama.layers.basic import Linear
from jaxllama.layers.rope import apply_rope, rope_cos_sin, rope_frequencies
from jaxllama.parallel.context import context_attend
from jaxllama.sharding import constrain


@struct.dataclass
class KVCache:
    """k, v [B S K H] preallocated to max_len; segment_ids [B S] (0 = empty or padding); length."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    length: jax.Array  # int32 scalar: slots written so far

    @classmethod
    def init(cls, cfg: AttentionConfig, batch: int, max_len: int, dtype) -> KVCache:
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   length=jnp.zeros((), jnp.int32))

    @staticmethod
    def logical_axes(cfg: AttentionConfig) -> KVCache:
        kv = ("batch", "cache_seq", "kv_heads", "head_dim")
        return KVCache(k=kv, v=kv, segment_ids=("batch", "cache_seq"), length=())

    def append(self, k, v, segment_ids) -> KVCache:
        """Write T new entries at `length`: k, v [B T K H], segment_ids [B T]."""
        at = self.length
        return KVCache(
            k=jax.lax.dynamic_update_slice_in_dim(self.k, k.astype(self.k.dtype), at, axis=1),
            v=jax.lax.dynamic_update_slice_in_dim(self.v, v.astype(self.v.dtype), at, axis=1),
            segment_ids=jax.lax.dynamic_update_slice_in_dim(self.segment_ids, segment_ids, at, axis=1),
            length=at + k.shape[1])


def rope_for(cfg: AttentionConfig, positions):
    """cos, sin [B T R] for this call's positions (dynamic scaling sees max position + 1)."""
    seq_len = None
    if cfg.rope.type in ("dynamic", "longrope"):
        seq_len = jnp.max(positions) + 1
    inv_freq, factor = rope_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, seq_len)
    return rope_cos_sin(positions, inv_freq, factor)


class Attention(nn.Module):
    """Causal GQA self-attention: (x [B T D], positions [B T], cache) -> (y [B T D], cache)."""

    cfg: AttentionConfig
    kernels: KernelConfig = KernelConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    # A sequence must fit in `max_position_embeddings` (attention over all past positions, rotated
    # at their true distance); a mixer without that limit sets this False.
    context_limited = True

    def project(self, x):
        """Un-rotated q [B T N H], k, v [B T K H] (lambda attention also needs them raw)."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=c.bias)
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        q = Linear((d,), (n, h), ("embed", "q_heads", "head_dim"), name="q_proj", **kw)(x)  # [B T N H]
        key = Linear((d,), (k, h), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)  # [B T K H]
        val = Linear((d,), (k, h), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
        return q, key, val

    def project_qkv(self, x, positions):
        q, key, val = self.project(x)
        cos, sin = rope_for(self.cfg, positions)
        return apply_rope(q, cos, sin), apply_rope(key, cos, sin), val

    def project_out(self, out):
        c = self.cfg
        out = constrain(out, ("batch", "seq", "act_heads", "head_dim"))
        return Linear((c.num_heads, c.head_dim), (c.hidden_size,), ("q_heads", "head_dim", "embed"),
                      name="o_proj", use_bias=c.bias, dtype=self.dtype,
                      param_dtype=self.param_dtype)(out)  # [B T N H] -> [B T D]

    @nn.compact
    def __call__(self, x, positions, cache: KVCache | None = None, segment_ids=None):
        q, k, v = self.project_qkv(x, positions)
        if segment_ids is None and cache is not None:
            segment_ids = jnp.ones(x.shape[:2], jnp.int32)
        impl = self.kernels.attention
        if cache is None and self.kernels.context_parallel != "none":
            # sequence sharded over the `seq` mesh axis (zigzag layout): ring or all-gather
            out = context_attend(q, k, v, segment_ids, mode=self.kernels.context_parallel,
                                 implementation=impl)
        elif cache is None:
            mask = Mask(causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
            out = attend(q, k, v, mask, implementation=impl)
        else:
            start = cache.length
            cache = cache.append(k, v, segment_ids)
            mask = Mask(causal=True, q_offset=start, q_segment_ids=segment_ids,
                        kv_segment_ids=cache.segment_ids)
            out = attend(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask,
                         implementation=impl)
        return self.project_out(out), cache
