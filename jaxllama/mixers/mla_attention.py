"""Multi-head latent attention (DeepSeek-V2/V3 MLA, METHODS section 8): kind `mla`.

Per token: a query `q = q_b(norm(q_a(x)))` (or `q_proj(x)` without `q_lora_rank`), N heads of
H + R = [nope | rope]; `[c, k_rope] = kv_a(x)` with the latent c of width L and ONE rope key of
width R shared by all heads; `c = norm(c)`. Keys and values come from the latent:
`[k_nope, v] = kv_b(c)` per kv head (K heads, H + U wide), the key is `[k_nope, k_rope]`.
Scores scale by `(H + R) ** -0.5`, times mscale(factor, mscale_all_dim)^2 under yarn with
`mscale_all_dim` (DeepSeek); without it (Zebra-Llama) yarn's mscale multiplies cos and sin only.
With K < N (Zebra-Llama's GQA-width kv_b) query head n reads kv head n // G, G = N / K.

Letters here: H = qk_nope_head_dim (the un-rotated part of a query/key head), R =
qk_rope_head_dim, L = kv_lora_rank, U = v_head_dim.

Two forms of one attention:
  - expanded (training, prefill): k, v [B S K H+R], [B S K U] from the latent, through `attend`;
  - absorbed (one-token decode): W_UK (kv_b's key rows) is folded into the query,
    `q_lat[n] = q_nope[n] . W_UK[n // G]` [L], and the query [q_lat | q_rope] (L + R wide) attends
    over the cache itself: keys [c | k_rope] (L + R), values c (L), one "kv head" for all N
    query heads; W_UV then maps the latent output to U per head before o_proj. Per step it reads
    S (L + R) cached numbers instead of expanding S N (H + U).
`MLACache` holds only the normalised latent [B S L] and the rotated rope key [B S R] (plus the
segment ids and length every cache keeps). The absorbed weights W_UK [K H L] and W_UV [K L U] are
built once for decode by `decode_params` (`MixerSpec.decode_params`, called by
`inference.decode.decode_weights`); without them (a module applied to its training params) the
decode step slices them from kv_b's kernel, the same numbers.

RoPE: `rope_interleave` (DeepSeek checkpoints) rotates adjacent pairs natively
(`apply_rope_interleaved`), so checkpoint rows are used as stored; the cache then holds the rope
key in that interleaved layout (transformers' permuted layout holds the same numbers in another
order; only dot products are read).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxllama.config import KernelConfig, MLAConfig, ModelConfig
from jaxllama.kernels.flash_attention import decode as mla_decode
from jaxllama.kernels.flash_attention.api import Mask, attend
from jaxllama.layers.basic import Linear, RMSNorm, default_init
from jaxllama.layers.rope import apply_rope, apply_rope_interleaved, rope_for
from jaxllama.mixers.attention import rollback_begin, rollback_end
from jaxllama.mixers.spec import HFTensor, MixerSpec, Rollback
from jaxllama.parallel.ring_mla import mla_context_attend
from jaxllama.sharding import constrain
from jaxllama.typing import Hidden, Positions, SegmentIds

F32 = jnp.float32


@dataclass(frozen=True)
class MLAttentionConfig:
    """What an MLA layer is built with: the model's width and context length and the `mla:`
    knobs (held, not copied); derived sizes are properties."""

    hidden_size: int  # D
    context_length: int  # the model's max_position_embeddings (yarn scales against it)
    mla: MLAConfig

    @classmethod
    def from_model(cls, cfg: ModelConfig) -> MLAttentionConfig:
        return cls(cfg.hidden_size, cfg.max_position_embeddings, cfg.mla)

    @property
    def num_heads(self) -> int:  # N
        return self.mla.num_heads

    @property
    def num_kv_heads(self) -> int:  # K: heads of kv_b (N for DeepSeek)
        return self.mla.num_heads if self.mla.num_kv_heads is None else self.mla.num_kv_heads

    @property
    def latent(self) -> int:  # L
        return self.mla.kv_lora_rank

    @property
    def nope(self) -> int:  # H
        return self.mla.qk_nope_head_dim

    @property
    def rope_dim(self) -> int:  # R
        return self.mla.qk_rope_head_dim

    @property
    def v_dim(self) -> int:  # U
        return self.mla.v_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.nope + self.rope_dim

    @property
    def softmax_scale(self) -> float:
        """(H + R) ** -0.5, times mscale(factor, mscale_all_dim)^2 under yarn with
        `mscale_all_dim` (transformers' `yarn_apply_mscale`)."""
        scale = self.qk_head_dim ** -0.5
        rope = self.mla.rope
        if rope.type == "yarn" and rope.mscale_all_dim and rope.factor > 1:
            m = 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
            scale *= m * m
        return scale

    def rotate(self, x, positions):
        """x [B T n R] rotated at positions [B T] (interleaved pairs or rotate-half)."""
        cos, sin = rope_for(self.mla.rope, self.rope_dim, self.context_length, positions)
        fn = apply_rope_interleaved if self.mla.rope_interleave else apply_rope
        return fn(x, cos, sin)


@struct.dataclass
class MLACache:
    """latent [B S L] (after kv_a_layernorm) and rope_k [B S R] (rotated at its own position),
    preallocated to max_len; segment_ids [B S] (0 = empty or padding); length."""

    latent: jax.Array
    rope_k: jax.Array
    segment_ids: jax.Array
    length: jax.Array  # int32 scalar: slots written so far

    @classmethod
    def init(cls, cfg: MLAttentionConfig, batch: int, max_len: int, dtype) -> MLACache:
        return cls(latent=jnp.zeros((batch, max_len, cfg.latent), dtype),
                   rope_k=jnp.zeros((batch, max_len, cfg.rope_dim), dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   length=jnp.zeros((), jnp.int32))

    @staticmethod
    def logical_axes(cfg: MLAttentionConfig) -> MLACache:
        return MLACache(latent=("batch", "cache_seq", "kv_lora"),
                        rope_k=("batch", "cache_seq", "head_dim"),
                        segment_ids=("batch", "cache_seq"), length=())

    def append(self, latent, rope_k, segment_ids) -> MLACache:
        """Write T new entries at `length`: latent [B T L], rope_k [B T R], segment_ids [B T]."""
        at = self.length
        put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), at,
                                                                   axis=1)
        return MLACache(latent=put(self.latent, latent), rope_k=put(self.rope_k, rope_k),
                        segment_ids=put(self.segment_ids, segment_ids),
                        length=at + latent.shape[1])


class Kernel(nn.Module):
    """A bare weight (`<name>/kernel`, laid out as `Linear`'s) for maps the mixer applies in two
    forms: kv_b expands the latent in training and is split into W_UK / W_UV for decode."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.with_logical_partitioning(default_init, self.axes),
                          self.shape, self.param_dtype)


def expand_latent(lat, rope_k, kv_b, nope: int, dtype):
    """The expanded form: keys [B S K H+R] = [k_nope | the shared rope key] and values
    [B S K U] from latents [B S L], rope keys [B S R] and kv_b [L K H+U] (H = `nope`)."""
    # [B S L] x [L K H+U] -> [B S K H+U]
    kv = jnp.einsum("bsl,lkh->bskh", lat.astype(dtype), kv_b.astype(dtype),
                    preferred_element_type=F32).astype(dtype)
    rope = jnp.broadcast_to(rope_k[:, :, None, :].astype(dtype),
                            kv.shape[:3] + (rope_k.shape[-1],))
    return jnp.concatenate([kv[..., :nope], rope], axis=-1), kv[..., nope:]


def absorbed_weights(cfg: MLAttentionConfig, kv_b):
    """kv_b [..., L K H+U] -> (W_UK [..., K H L], W_UV [..., K L U]): the key part transposed
    for folding into the query, the value part per kv head. Leading axes (a layer axis) pass."""
    h = cfg.nope
    w_uk = jnp.swapaxes(jnp.moveaxis(kv_b[..., :h], -3, -2), -1, -2)  # [.. L K H] -> [.. K H L]
    w_uv = jnp.moveaxis(kv_b[..., h:], -3, -2)  # [.. L K U] -> [.. K L U]
    return w_uk, w_uv


def decode_params(cfg: MLAttentionConfig, params: dict) -> dict:
    """The mixer params plus `absorbed` {w_uk, w_uv}, built once for decode (see the module
    docstring); the spec's `decode_params` hook."""
    w_uk, w_uv = absorbed_weights(cfg, params["kv_b_proj"]["kernel"])
    return {**params, "absorbed": {"w_uk": w_uk, "w_uv": w_uv}}


class MLAttention(nn.Module):
    """Causal MLA: (x [B T D], positions [B T], cache) -> (y [B T D], cache). One-token calls with
    a cache run the absorbed form (`mla.decode`: absorbed); every other call the expanded form."""

    cfg: MLAttentionConfig
    kernels: KernelConfig = KernelConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _kw(self, bias: bool = False):
        return {"dtype": self.dtype, "param_dtype": self.param_dtype, "use_bias": bias}

    def query(self, x: Hidden, positions: Positions):
        """q_nope [B T N H] and the rotated q_rope [B T N R]."""
        c, m = self.cfg, self.cfg.mla
        d, n, qk = c.hidden_size, c.num_heads, c.qk_head_dim
        if m.q_lora_rank is None:
            q = Linear((d,), (n, qk), ("embed", "q_heads", "head_dim"), name="q_proj",
                       **self._kw())(x)  # [B T N H+R]
        else:
            a = Linear((d,), (m.q_lora_rank,), ("embed", "q_lora"), name="q_a_proj",
                       **self._kw(m.bias))(x)  # [B T Q]
            if m.q_a_layernorm:
                a = RMSNorm(m.norm_eps, name="q_a_layernorm", dtype=self.dtype,
                            param_dtype=self.param_dtype)(a)
            q = Linear((m.q_lora_rank,), (n, qk), ("q_lora", "q_heads", "head_dim"),
                       name="q_b_proj", **self._kw())(a)  # [B T N H+R]
        return q[..., :c.nope], c.rotate(q[..., c.nope:], positions)

    def latent(self, x: Hidden, positions: Positions):
        """The normalised latent [B T L] and the rotated shared rope key [B T R]."""
        c, m = self.cfg, self.cfg.mla
        kv = Linear((c.hidden_size,), (c.latent + c.rope_dim,), ("embed", "kv_lora"),
                    name="kv_a_proj_with_mqa", **self._kw(m.bias))(x)  # [B T L+R]
        lat, rope_k = kv[..., :c.latent], kv[..., c.latent:]
        if m.kv_a_layernorm:
            lat = RMSNorm(m.norm_eps, name="kv_a_layernorm", dtype=self.dtype,
                          param_dtype=self.param_dtype)(lat)
        return lat, c.rotate(rope_k[:, :, None, :], positions)[:, :, 0, :]

    def kv_b(self):
        c = self.cfg
        return Kernel((c.latent, c.num_kv_heads, c.nope + c.v_dim),
                      ("kv_lora", "kv_heads", "head_dim"), self.param_dtype, name="kv_b_proj")()

    def expand(self, lat, rope_k, kv_b):
        """Keys [B S K H+R] and values [B S K U] of latents [B S L] and rope keys [B S R]."""
        return expand_latent(lat, rope_k, kv_b, self.cfg.nope, self.dtype)

    def project_out(self, out) -> Hidden:
        c = self.cfg
        out = constrain(out, ("batch", "seq", "act_heads", "head_dim"))
        return Linear((c.num_heads, c.v_dim), (c.hidden_size,), ("q_heads", "head_dim", "embed"),
                      name="o_proj", **self._kw(c.mla.bias))(out)  # [B T N U] -> [B T D]

    def absorbed(self, q_nope, q_rope, cache: MLACache, mask: Mask, kv_b):
        """Attention in latent space over the cache: out [B T N U]. One query token runs the
        flash-decoding op `mla_decode` (split over the cache, latent and rope key never
        concatenated); an implementation that op lacks (`pallas_tpu`) runs `attend` over the
        concatenated [latent | rope_k] keys with that implementation."""
        c = self.cfg
        b, t, n, _ = q_nope.shape
        k, g = c.num_kv_heads, n // c.num_kv_heads
        if self.has_variable("params", "absorbed"):  # built once by `decode_params`
            ab = self.get_variable("params", "absorbed")
            w_uk, w_uv = ab["w_uk"], ab["w_uv"]
        else:
            w_uk, w_uv = absorbed_weights(c, kv_b)
        qg = q_nope.reshape(b, t, k, g, c.nope).astype(self.dtype)
        # [B T K G H] x [K H L] -> [B T K G L]: W_UK folded into the query
        q_lat = jnp.einsum("btkgh,khl->btkgl", qg, w_uk.astype(self.dtype),
                           preferred_element_type=F32).astype(self.dtype)
        q_lat = q_lat.reshape(b, t, n, c.latent)
        impl = self.kernels.attention
        if t == 1 and mla_decode.has_implementation(impl):
            out = mla_decode.decode_attend(
                q_lat[:, 0], q_rope[:, 0].astype(self.dtype), cache.latent, cache.rope_k,
                mask.q_offset, mask.q_segment_ids[:, 0], mask.kv_segment_ids,
                scale=c.softmax_scale, implementation=impl)[:, None]  # [B 1 N L]
        else:
            q = jnp.concatenate([q_lat, q_rope.astype(self.dtype)], -1)  # [B T N L+R]
            keys = jnp.concatenate([cache.latent, cache.rope_k], -1)[:, :, None]
            vals = cache.latent[:, :, None]  # [B S 1 L]
            out = attend(q, keys.astype(self.dtype), vals.astype(self.dtype), mask,
                         scale=c.softmax_scale, implementation=impl)  # [B T N L]
        # [B T K G L] x [K L U] -> [B T K G U]
        out = jnp.einsum("btkgl,klu->btkgu", out.reshape(b, t, k, g, c.latent),
                         w_uv.astype(self.dtype), preferred_element_type=F32)
        return out.reshape(b, t, n, c.v_dim).astype(self.dtype)

    @nn.compact
    def __call__(self, x: Hidden, positions: Positions, cache: MLACache | None = None,
                 segment_ids: SegmentIds | None = None) -> tuple[Hidden, MLACache | None]:
        c = self.cfg
        q_nope, q_rope = self.query(x, positions)
        lat, rope_k = self.latent(x, positions)
        kv_b = self.kv_b()
        if segment_ids is None and cache is not None:
            segment_ids = jnp.ones(x.shape[:2], jnp.int32)
        impl = self.kernels.attention
        if cache is None:
            if self.kernels.context_parallel != "none":
                # the sequence is sharded over `seq`: the latent travels around the ring
                out = mla_context_attend(
                    jnp.concatenate([q_nope, q_rope], -1), lat, rope_k, kv_b, segment_ids,
                    expand=functools.partial(expand_latent, nope=c.nope, dtype=self.dtype),
                    mode=self.kernels.context_parallel, implementation=impl,
                    scale=c.softmax_scale)
            else:
                k, v = self.expand(lat, rope_k, kv_b)
                q = jnp.concatenate([q_nope, q_rope], -1)
                mask = Mask(causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
                out = attend(q, k, v, mask, scale=c.softmax_scale, implementation=impl)
        else:
            start = cache.length
            cache = cache.append(lat, rope_k, segment_ids)
            mask = Mask(causal=True, q_offset=start, q_segment_ids=segment_ids,
                        kv_segment_ids=cache.segment_ids)
            if x.shape[1] == 1 and c.mla.decode == "absorbed":
                out = self.absorbed(q_nope, q_rope, cache, mask, kv_b)
            else:
                k, v = self.expand(cache.latent, cache.rope_k, kv_b)
                q = jnp.concatenate([q_nope, q_rope], -1)
                out = attend(q, k, v, mask, scale=c.softmax_scale, implementation=impl)
        return self.project_out(out), cache


def hf_tensors(cfg: MLAttentionConfig) -> tuple[HFTensor, ...]:
    """The DeepSeek `self_attn.*` tensors of one layer (HF [out, in]; ours [in.., out..])."""
    m = cfg.mla
    d, n, qk = cfg.hidden_size, cfg.num_heads, cfg.qk_head_dim
    lr, k = cfg.latent + cfg.rope_dim, cfg.num_kv_heads

    def mat(name, path, hf_shape, shape):
        return HFTensor(f"self_attn.{name}.weight", ("mixer", path, "kernel"), hf_shape, shape,
                        True)

    def vec(name, path, leaf, size):
        return HFTensor(f"self_attn.{name}", ("mixer", path, leaf), (size,), (size,), False)

    out = []
    if m.q_lora_rank is None:
        out.append(mat("q_proj", "q_proj", (n * qk, d), (d, n, qk)))
    else:
        out.append(mat("q_a_proj", "q_a_proj", (m.q_lora_rank, d), (d, m.q_lora_rank)))
        if m.bias:
            out.append(vec("q_a_proj.bias", "q_a_proj", "bias", m.q_lora_rank))
        if m.q_a_layernorm:
            out.append(vec("q_a_layernorm.weight", "q_a_layernorm", "scale", m.q_lora_rank))
        out.append(mat("q_b_proj", "q_b_proj", (n * qk, m.q_lora_rank), (m.q_lora_rank, n, qk)))
    out.append(mat("kv_a_proj_with_mqa", "kv_a_proj_with_mqa", (lr, d), (d, lr)))
    if m.bias:
        out.append(vec("kv_a_proj_with_mqa.bias", "kv_a_proj_with_mqa", "bias", lr))
    if m.kv_a_layernorm:
        out.append(vec("kv_a_layernorm.weight", "kv_a_layernorm", "scale", cfg.latent))
    hu = cfg.nope + cfg.v_dim
    out.append(mat("kv_b_proj", "kv_b_proj", (k * hu, cfg.latent), (cfg.latent, k, hu)))
    out.append(mat("o_proj", "o_proj", (d, n * cfg.v_dim), (n, cfg.v_dim, d)))
    if m.bias:
        out.append(HFTensor("self_attn.o_proj.bias", ("mixer", "o_proj", "bias"), (d,), (d,),
                            False))
    return tuple(out)


def flops_per_token(cfg: MLAttentionConfig, seq_len: int) -> float:
    """Expanded-form causal scores (H + R) and values (U) per head: the mean query sees
    seq_len / 2 keys, 2 FLOPs per multiply-add."""
    return seq_len * cfg.num_heads * (cfg.qk_head_dim + cfg.v_dim)


SPEC = MixerSpec(
    kind="mla",
    module=MLAttention,
    cache=MLACache,
    config_cls=MLAttentionConfig,
    config_field="mla",
    context_limited=True,  # every past key, rotated at its true distance
    context_parallel=("ring",),  # the latent travels (parallel/ring_mla.py)
    uses_rope=True,
    padding="segment_ids",
    cache_growth="linear",
    hf_tensors=hf_tensors,
    flops_per_token=flops_per_token,
    decode_params=decode_params,
    # a latent cache rolls back as an attention cache does: by length (slots past it are future)
    rollback=Rollback(rollback_begin, rollback_end),
)

__all__ = ["SPEC", "MLACache", "MLAttention", "MLAttentionConfig", "absorbed_weights",
           "decode_params", "expand_latent", "hf_tensors"]
