"""Mamba2 (SSD) layers (METHODS section 9), their constant-size cache and spec.

in_proj -> [z E | x | B | C | dt h] (that order); causal depthwise conv + SiLU over [x, B, C];
dt = clamp(softplus(dt + dt_bias), time_step_limit) per head; A = -exp(A_log), a scalar decay per
head; SSD scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ([P Z] per head), y_t = h_t C_t + D x_t
(kernels/ssm_scan, D per head or per channel); gated RMSNorm over groups of channels
(`norm_before_gate` False: norm(y * silu(z)); True: norm(y) * silu(z)); out_proj. E = h x P
(letters: h heads, P head dim, Z state, G groups of B and C).

Zebra-Llama's variant (`xb_heads` = k > 0, METHODS section 11): x and B come out of in_proj and
the conv at k heads (k x P and k x Z channels, P = Z) and are repeated over the heads after the
conv (head i reads x head i // (h / k)), C has G = n_groups groups; B is repeated to the G
groups of C before the scan.

Padding, packing and the cache follow `mamba.py` (segment id 0 feeds nothing; the conv window
and the state restart at segment boundaries); the cache holds the last W-1 pre-conv [x, B, C]
inputs, the SSM state [B h P Z] in float32 and the last nonzero segment id.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxllama.config import ConfigError, KernelConfig, Mamba2Config, ModelConfig
from jaxllama.kernels.ssm_scan.api import ssd_scan
from jaxllama.layers.basic import Linear
from jaxllama.mixers.mamba import (
    SEQ_AXIS,
    CausalConv,
    conv_window,
    inverse_softplus_dt,
    segment_state,
    seq_shard_map,
    sequence_parallel,
)
from jaxllama.mixers.spec import HFTensor, MixerSpec
from jaxllama.parallel.ssm_sequence import sequence_ssd_scan
from jaxllama.typing import Hidden, Positions, SegmentIds


@dataclass(frozen=True)
class Mamba2LayerConfig:
    """What a Mamba2 layer is built with: the model width and RMSNorm eps, and the `mamba2:`
    knobs (held). Widths of the in_proj pieces are properties."""

    hidden_size: int  # D
    rms_norm_eps: float
    mamba2: Mamba2Config

    @classmethod
    def from_model(cls, cfg: ModelConfig) -> Mamba2LayerConfig:
        return cls(cfg.hidden_size, cfg.rms_norm_eps, cfg.mamba2)

    @property
    def num_heads(self) -> int:  # h
        return self.mamba2.heads_for(self.hidden_size)

    @property
    def inner_size(self) -> int:  # E
        return self.num_heads * self.mamba2.head_dim

    @property
    def x_width(self) -> int:
        return (self.mamba2.xb_heads or self.num_heads) * self.mamba2.head_dim

    @property
    def b_width(self) -> int:
        m = self.mamba2
        return (m.xb_heads or m.n_groups) * m.state_size

    @property
    def conv_channels(self) -> int:  # [x | B | C]
        return self.x_width + self.b_width + self.mamba2.n_groups * self.mamba2.state_size

    @property
    def proj_size(self) -> int:  # [z | x B C | dt]
        return self.inner_size + self.conv_channels + self.num_heads

    @property
    def norm_group_size(self) -> int:
        return self.mamba2.norm_group_size or self.inner_size // self.mamba2.n_groups

    @property
    def norm_eps(self) -> float:
        eps = self.mamba2.norm_eps
        return self.rms_norm_eps if eps is None else eps

    def __post_init__(self):
        h, m = self.num_heads, self.mamba2
        groups = self.inner_size // m.n_groups if h else 1
        for ok, msg in ((h > 0, f"no heads: expand x hidden_size < head_dim {m.head_dim}"),
                        (h % m.n_groups == 0, f"n_groups {m.n_groups} does not divide {h} heads"),
                        (not m.xb_heads or h % m.xb_heads == 0,
                         f"xb_heads {m.xb_heads} does not divide the {h} heads"),
                        (not h or self.inner_size % (m.norm_group_size or groups) == 0,
                         f"norm_group_size {m.norm_group_size} does not divide {self.inner_size}")):
            if not ok:
                raise ConfigError(f"mamba2: {msg}")


@struct.dataclass
class Mamba2Cache:
    """conv [B W-1 C]: the last W-1 pre-conv [x, B, C] inputs (oldest first), conv_segment_ids
    [B W-1] (0 = empty or padding); ssm [B h P Z] float32; segment [B]: the row's last nonzero
    segment id."""

    conv: jax.Array
    conv_segment_ids: jax.Array
    ssm: jax.Array
    segment: jax.Array

    @classmethod
    def init(cls, cfg: Mamba2LayerConfig, batch: int, max_len: int, dtype) -> Mamba2Cache:
        """`max_len` is accepted for the common cache signature and ignored: the size is fixed."""
        del max_len
        m, w = cfg.mamba2, cfg.mamba2.conv_kernel
        return cls(conv=jnp.zeros((batch, w - 1, cfg.conv_channels), dtype),
                   conv_segment_ids=jnp.zeros((batch, w - 1), jnp.int32),
                   ssm=jnp.zeros((batch, cfg.num_heads, m.head_dim, m.state_size), jnp.float32),
                   segment=jnp.zeros((batch,), jnp.int32))

    @staticmethod
    def logical_axes(cfg: Mamba2LayerConfig) -> Mamba2Cache:
        return Mamba2Cache(conv=("batch", "conv_width", "ssm_conv"),
                           conv_segment_ids=("batch", "conv_width"),
                           ssm=("batch", "ssm_heads", "head_dim", "ssm_state"),
                           segment=("batch",))


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of `group_size` channels with a SiLU gate, statistics in float32:
    y [B T E], z [B T E] -> [B T E] (weight `scale` [E])."""

    group_size: int
    eps: float
    norm_before_gate: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y, z):
        e = y.shape[-1]
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("ssm_inner",)),
                       (e,), self.param_dtype)
        yf, gate = y.astype(jnp.float32), nn.silu(z.astype(jnp.float32))
        if not self.norm_before_gate:
            yf = yf * gate
        grouped = yf.reshape(yf.shape[:-1] + (e // self.group_size, self.group_size))
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, -1, keepdims=True) + self.eps)
        yf = grouped.reshape(yf.shape)
        if self.norm_before_gate:
            yf = yf * gate
        return w.astype(self.dtype) * yf.astype(self.dtype)


class Mamba2Mixer(nn.Module):
    """Mamba2: (x [B T D], positions [B T] (unused), cache, segment_ids [B T]) -> (y [B T D],
    cache). Parameter names follow HF `Mamba2Mixer` (in_proj, conv1d, dt_bias, A_log, D, norm,
    out_proj)."""

    cfg: Mamba2LayerConfig
    kernels: KernelConfig = KernelConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Hidden, positions: Positions, cache: Mamba2Cache | None = None,
                 segment_ids: SegmentIds | None = None) -> tuple[Hidden, Mamba2Cache | None]:
        del positions
        c, m = self.cfg, self.cfg.mamba2
        h, p, n, g, e = c.num_heads, m.head_dim, m.state_size, m.n_groups, c.inner_size
        b, t, _ = x.shape
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if cache is not None and segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        proj = Linear((c.hidden_size,), (c.proj_size,), ("embed", "ssm_proj"),
                      use_bias=m.use_bias, name="in_proj", **kw)(x)  # [B T D] -> [B T proj]
        z, xbc, dt = jnp.split(proj, [e, e + c.conv_channels], axis=-1)
        sharded = sequence_parallel(self.kernels, cache)
        window, window_ids, conv_ids = conv_window(cache, xbc, segment_ids, m.conv_kernel)
        conv, window, window_ids = CausalConv(c.conv_channels, m.conv_kernel, m.use_conv_bias,
                                              name="conv1d", **kw)(xbc, window, window_ids,
                                                                   conv_ids, sharded)
        xbc = nn.silu(conv).astype(self.dtype)
        xs, bmat, cmat = jnp.split(xbc, [c.x_width, c.x_width + c.b_width], axis=-1)
        xs = xs.reshape(b, t, -1, p)  # [B T h P], or [B T k P] for Zebra
        bmat, cmat = bmat.reshape(b, t, -1, n), cmat.reshape(b, t, g, n)
        if m.xb_heads:  # Zebra-Llama: x and B at k heads, repeated after the conv
            xs = jnp.repeat(xs, h // m.xb_heads, axis=2)
            bmat = jnp.repeat(bmat, g // m.xb_heads, axis=2)
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(inverse_softplus_dt,
                                                                    ("ssm_heads",)),
                             (h,), self.param_dtype)
        lo, hi = m.time_step_limit
        dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32)),
                      lo, hi)  # [B T h]
        a_log = self.param("A_log", nn.with_logical_partitioning(
            lambda k, s, dtype: jnp.log(jax.random.uniform(k, s, dtype, 1.0, 16.0)),
            ("ssm_heads",)), (h,), self.param_dtype)
        d_shape, d_axes = ((h, p), ("ssm_heads", "head_dim")) if m.d_per_channel else ((h,), (
            "ssm_heads",))
        dskip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, d_axes),
                           d_shape, self.param_dtype)
        a = -jnp.exp(a_log.astype(jnp.float32))  # [h]
        scan = {"D": dskip, "chunk_size": m.chunk_size, "implementation": self.kernels.ssm_scan}
        if sharded:  # local scans from zero, shard states combined, outputs corrected
            y = seq_shard_map(lambda xs, dt, bm, cm, seg, a, dk: sequence_ssd_scan(
                xs, dt, a, bm, cm, D=dk, segment_ids=seg, axis_name=SEQ_AXIS, layout="zigzag",
                chunk_size=m.chunk_size, implementation=self.kernels.ssm_scan)[0],
                [xs, dt, bmat, cmat, segment_ids], [a, dskip])
        elif cache is None:
            y, _ = ssd_scan(xs, dt, a, bmat, cmat, segment_ids=segment_ids, **scan)
        else:
            reset, last = segment_state(cache.segment, segment_ids)
            state = jnp.where(reset[:, None, None, None], 0.0, cache.ssm)
            if t == 1:
                y, state = recurrence_step(xs, dt, a, bmat, cmat, dskip, state, segment_ids)
            else:
                y, state = ssd_scan(xs, dt, a, bmat, cmat, initial_state=state,
                                    segment_ids=segment_ids, **scan)
            cache = Mamba2Cache(conv=window.astype(cache.conv.dtype), conv_segment_ids=window_ids,
                                ssm=state, segment=last)
        y = GatedRMSNorm(c.norm_group_size, c.norm_eps, m.norm_before_gate, name="norm", **kw)(
            y.reshape(b, t, e), z)
        out = Linear((e,), (c.hidden_size,), ("ssm_inner", "embed"), use_bias=m.use_bias,
                     name="out_proj", **kw)(y)  # [B T E] -> [B T D]
        return out, cache


def recurrence_step(xs, dt, a, bmat, cmat, dskip, state, segment_ids):
    """One token (T = 1) of the SSD recurrence: x [B 1 h P], dt [B 1 h], a [h], B, C [B 1 G Z],
    state [B h P Z] float32 -> (y [B 1 h P], state); a padding token (id 0) keeps the state.
    Decode runs this instead of the scan kernel: one step needs no chunking."""
    h = xs.shape[2]
    g = bmat.shape[2]
    xf, df = xs[:, 0].astype(jnp.float32), dt[:, 0]
    bm = jnp.repeat(bmat[:, 0].astype(jnp.float32), h // g, axis=1)  # [B h Z]
    cm = jnp.repeat(cmat[:, 0].astype(jnp.float32), h // g, axis=1)
    decay = jnp.exp(df * a)[:, :, None, None]
    new = state * decay + jnp.einsum("bh,bhp,bhz->bhpz", df, xf, bm)
    new = jnp.where((segment_ids[:, 0] != 0)[:, None, None, None], new, state)
    dskip = dskip.astype(jnp.float32)
    dskip = dskip if dskip.ndim == 2 else dskip[:, None]  # [h P] or [h 1]
    y = jnp.einsum("bhpz,bhz->bhp", new, cm) + xf * dskip  # [B h P]
    return y[:, None].astype(xs.dtype), new


# ----------------------------------------------------------------------------- spec


def hf_tensors(cfg: Mamba2LayerConfig) -> tuple[HFTensor, ...]:
    """HF `Mamba2Mixer` tensors of one layer, relative to the layer prefix (`mixer.*`); D per
    channel is stored flat [h P] (mamba_ssm's `D_has_hdim`)."""
    m = cfg.mamba2
    d, e, h, w, ch = cfg.hidden_size, cfg.inner_size, cfg.num_heads, m.conv_kernel, cfg.conv_channels
    d_hf, d_ours = ((h * m.head_dim,), (h, m.head_dim)) if m.d_per_channel else ((h,), (h,))
    out = [HFTensor("mixer.A_log", ("mixer", "A_log"), (h,), (h,), False),
           HFTensor("mixer.D", ("mixer", "D"), d_hf, d_ours, False),
           HFTensor("mixer.conv1d.weight", ("mixer", "conv1d", "kernel"), (ch, 1, w), (w, ch), True)]
    if m.use_conv_bias:
        out.append(HFTensor("mixer.conv1d.bias", ("mixer", "conv1d", "bias"), (ch,), (ch,), False))
    out += [HFTensor("mixer.dt_bias", ("mixer", "dt_bias"), (h,), (h,), False),
            HFTensor("mixer.in_proj.weight", ("mixer", "in_proj", "kernel"),
                     (cfg.proj_size, d), (d, cfg.proj_size), True)]
    if m.use_bias:
        out.append(HFTensor("mixer.in_proj.bias", ("mixer", "in_proj", "bias"),
                            (cfg.proj_size,), (cfg.proj_size,), False))
    out += [HFTensor("mixer.norm.weight", ("mixer", "norm", "scale"), (e,), (e,), False),
            HFTensor("mixer.out_proj.weight", ("mixer", "out_proj", "kernel"), (d, e), (e, d),
                     True)]
    if m.use_bias:
        out.append(HFTensor("mixer.out_proj.bias", ("mixer", "out_proj", "bias"), (d,), (d,),
                            False))
    return tuple(out)


def flops_per_token(cfg: Mamba2LayerConfig, seq_len: int) -> float:
    """Chunked SSD per token, chunk Q = min(chunk_size, seq_len): the within-chunk scores C.B and
    their product with x over the Q / 2 earlier tokens of the chunk on average (2 Q (Z + P) / 2
    per head), the chunk-state and state-to-output products (2 x 2 P Z per head); plus the conv
    (2 W per channel)."""
    m = cfg.mamba2
    q = min(m.chunk_size, seq_len)
    per_head = q * (m.state_size + m.head_dim) + 4.0 * m.head_dim * m.state_size
    return cfg.num_heads * per_head + 2.0 * cfg.conv_channels * m.conv_kernel


SPEC = MixerSpec(
    kind="mamba2",
    module=Mamba2Mixer,
    cache=Mamba2Cache,
    config_cls=Mamba2LayerConfig,
    config_field="mamba2",
    context_limited=False,  # no positions: a recurrence over any length
    context_parallel=("ring", "allgather"),  # either mode: the zigzag-sharded sequence scan
    uses_rope=False,
    padding="state_reset",
    cache_growth="constant",
    hf_tensors=hf_tensors,
    flops_per_token=flops_per_token,
)

__all__ = ["SPEC", "GatedRMSNorm", "Mamba2Cache", "Mamba2Config", "Mamba2LayerConfig",
           "Mamba2Mixer", "hf_tensors"]
