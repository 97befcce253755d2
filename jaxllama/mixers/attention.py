"""Dense GQA attention with RoPE, its preallocated KV cache, its layer config and its spec.

One code path for training (`cache=None`), chunked prefill and one-token decode: with a cache the
call writes its T new keys/values at `cache.length` and attends over all S slots; slots not yet
written (and padding) carry segment id 0 and are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxllama.config import AttentionConfig, KernelConfig, ModelConfig
from jaxllama.kernels.flash_attention.api import Mask, attend
from jaxllama.layers.basic import Linear
from jaxllama.layers.rope import apply_rope, rope_for, rotary_dim
from jaxllama.mixers.spec import HFTensor, MixerSpec, Rollback
from jaxllama.parallel.context import context_attend
from jaxllama.sharding import constrain
from jaxllama.typing import Hidden, Positions, SegmentIds


@dataclass(frozen=True)
class AttentionLayerConfig:
    """What an attention layer is built with: the model's width and context length, and the
    `attention:` knobs (held, not copied). Derived values are properties."""

    hidden_size: int  # D
    context_length: int  # the model's max_position_embeddings (RoPE scaling reads it)
    attention: AttentionConfig

    @classmethod
    def from_model(cls, cfg: ModelConfig) -> AttentionLayerConfig:
        return cls(cfg.hidden_size, cfg.max_position_embeddings, cfg.attention)

    @property
    def head_dim(self) -> int:  # H
        return self.attention.head_dim_for(self.hidden_size)

    @property
    def rotary_dim(self) -> int:  # R
        return rotary_dim(self.attention.rope, self.head_dim)

    def rope(self, positions):
        """cos, sin [B T R] of this layer's RoPE at `positions` [B T]."""
        return rope_for(self.attention.rope, self.rotary_dim, self.context_length, positions)


@struct.dataclass
class KVCache:
    """k, v [B S K H] preallocated to max_len; segment_ids [B S] (0 = empty or padding); length."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    length: jax.Array  # int32 scalar: slots written so far

    @classmethod
    def init(cls, cfg: AttentionLayerConfig, batch: int, max_len: int, dtype) -> KVCache:
        shape = (batch, max_len, cfg.attention.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   length=jnp.zeros((), jnp.int32))

    @staticmethod
    def logical_axes(cfg: AttentionLayerConfig) -> KVCache:
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


class Attention(nn.Module):
    """Causal GQA self-attention: (x [B T D], positions [B T], cache) -> (y [B T D], cache)."""

    cfg: AttentionLayerConfig
    kernels: KernelConfig = KernelConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def project(self, x: Hidden):
        """Un-rotated q [B T N H], k, v [B T K H] (lambda attention also needs them raw). A decode
        copy of the weights may hold `qkv_proj` [D N+2K H] (`fuse_decode_params`) in place of the
        three: one product per token instead of three."""
        c, a = self.cfg, self.cfg.attention
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "use_bias": a.bias}
        d, n, k, h = c.hidden_size, a.num_heads, a.num_kv_heads, c.head_dim
        if self.has_variable("params", "qkv_proj"):
            qkv = Linear((d,), (n + 2 * k, h), ("embed", "q_heads", "head_dim"), name="qkv_proj",
                         **kw)(x)  # [B T N+2K H]
            return qkv[..., :n, :], qkv[..., n:n + k, :], qkv[..., n + k:, :]
        q = Linear((d,), (n, h), ("embed", "q_heads", "head_dim"), name="q_proj", **kw)(x)  # [B T N H]
        key = Linear((d,), (k, h), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)  # [B T K H]
        val = Linear((d,), (k, h), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
        return q, key, val

    def project_qkv(self, x: Hidden, positions: Positions):
        q, key, val = self.project(x)
        cos, sin = self.cfg.rope(positions)
        return apply_rope(q, cos, sin), apply_rope(key, cos, sin), val

    def project_out(self, out) -> Hidden:
        c, a = self.cfg, self.cfg.attention
        out = constrain(out, ("batch", "seq", "act_heads", "head_dim"))
        return Linear((a.num_heads, c.head_dim), (c.hidden_size,), ("q_heads", "head_dim", "embed"),
                      name="o_proj", use_bias=a.bias, dtype=self.dtype,
                      param_dtype=self.param_dtype)(out)  # [B T N H] -> [B T D]

    @staticmethod
    def fuse_decode_params(params: dict) -> dict:
        """The mixer's params with q_proj, k_proj, v_proj [.. D N|K H] (and biases [.. N|K H])
        replaced by `qkv_proj` [.. D N+2K H], concatenated along the heads axis (leading layer
        axes pass through): what `project` reads in place of the three. Every subclass that
        projects through `project` (lambda, FoT) reads it too."""
        names = ("q_proj", "k_proj", "v_proj")
        fused = {"kernel": jnp.concatenate([params[p]["kernel"] for p in names], axis=-2)}
        if "bias" in params["q_proj"]:
            fused["bias"] = jnp.concatenate([params[p]["bias"] for p in names], axis=-2)
        return {**{k: v for k, v in params.items() if k not in names}, "qkv_proj": fused}

    @nn.compact
    def __call__(self, x: Hidden, positions: Positions, cache: KVCache | None = None,
                 segment_ids: SegmentIds | None = None) -> tuple[Hidden, KVCache | None]:
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


def hf_tensors(cfg: AttentionLayerConfig) -> tuple[HFTensor, ...]:
    """The Llama `self_attn.*` tensors of one layer (HF [out, in] matrices; ours [in.., out..])."""
    a = cfg.attention
    d, n, k, h = cfg.hidden_size, a.num_heads, a.num_kv_heads, cfg.head_dim
    out = []
    for proj, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
        out.append(HFTensor(f"self_attn.{proj}.weight", ("mixer", proj, "kernel"), (heads * h, d),
                            (d, heads, h), True))
        if a.bias:
            out.append(HFTensor(f"self_attn.{proj}.bias", ("mixer", proj, "bias"), (heads * h,),
                                (heads, h), False))
    out.append(HFTensor("self_attn.o_proj.weight", ("mixer", "o_proj", "kernel"), (d, n * h),
                        (n, h, d), True))
    if a.bias:
        out.append(HFTensor("self_attn.o_proj.bias", ("mixer", "o_proj", "bias"), (d,), (d,),
                            False))
    return tuple(out)


def flops_per_token(cfg: AttentionLayerConfig, seq_len: int) -> float:
    """Causal scores and values: the mean query sees seq_len / 2 keys; 2 products of N x H
    multiply-adds per key, 2 FLOPs each."""
    return 2.0 * seq_len * cfg.attention.num_heads * cfg.head_dim


def rollback_begin(cache: KVCache, t: int):
    """Speculative decoding (`Rollback`): the length before a call appending t tokens."""
    del t
    return cache, cache.length


def rollback_end(cache: KVCache, start, keep) -> KVCache:
    """Keep the first `keep` appended slots: the rest lie past `length`, where the causal mask
    hides them as future keys until the next append overwrites them."""
    return cache.replace(length=start + keep)


SPEC = MixerSpec(
    kind="dense",
    module=Attention,
    cache=KVCache,
    config_cls=AttentionLayerConfig,
    config_field="attention",
    context_limited=True,  # every past key, rotated at its true distance
    context_parallel=("ring", "allgather"),
    uses_rope=True,
    padding="segment_ids",
    cache_growth="linear",
    hf_tensors=hf_tensors,
    flops_per_token=flops_per_token,
    rollback=Rollback(rollback_begin, rollback_end),
)

__all__ = ["SPEC", "Attention", "AttentionLayerConfig", "KVCache", "hf_tensors"]
