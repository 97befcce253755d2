"""Mamba1 selective-scan layers (METHODS section 9), their constant-size cache and spec.

in_proj -> (x, z) [B T E]; x -> causal depthwise conv (width W) + SiLU -> x_proj -> (dt_low [R],
B, C [G Z]) -> dt = softplus(dt_proj(dt_low)); selective scan h_t = exp(dt_t A) h_{t-1} +
dt_t B_t x_t, y_t = C_t . h_t + D x_t (kernels/ssm_scan); y * silu(z) -> out_proj. B and C are
shared by G groups of E / G channels (G = 1 is plain Mamba1).

Padding and packing. A position with segment id 0 feeds nothing: its conv input is masked out of
every window and the scan leaves the state unchanged there. A conv tap reads an earlier input
only when both carry the same nonzero segment id, and the scan restarts from zero where the id
changes to a new nonzero one, so packed rows reset the state and the conv window at every
boundary and a left-padded row computes what it computes alone. Padding inside a row is a
boundary too: it holds a slot of the conv window (no compaction).

Cache (`MambaCache`): the last W-1 conv inputs with their segment ids, the SSM state [B E Z] in
float32 whatever the compute dtype, and each row's last nonzero segment id (the state carries
into a chunk only when that chunk continues the same segment). With a cache a call appends
T >= 1 tokens; one token is the recurrence step itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from jaxllama.config import ConfigError, KernelConfig, MambaConfig, ModelConfig
from jaxllama.kernels.ssm_scan.api import selective_scan
from jaxllama.layers.basic import Linear
from jaxllama.mixers.spec import HFTensor, MixerSpec
from jaxllama.parallel.ssm_sequence import conv_halo, sequence_selective_scan
from jaxllama.sharding import logical_to_mesh_spec, mesh_axis_size
from jaxllama.typing import Hidden, Positions, SegmentIds

SEQ_AXIS = "seq"


@dataclass(frozen=True)
class MambaLayerConfig:
    """What a Mamba1 layer is built with: the model width and the `mamba:` knobs (held)."""

    hidden_size: int  # D
    mamba: MambaConfig

    @classmethod
    def from_model(cls, cfg: ModelConfig) -> MambaLayerConfig:
        return cls(cfg.hidden_size, cfg.mamba)

    def __post_init__(self):
        if self.inner_size % self.mamba.n_groups:
            raise ConfigError(f"mamba.n_groups: {self.mamba.n_groups} does not divide the inner "
                              f"width {self.inner_size}")

    @property
    def inner_size(self) -> int:  # E
        return self.mamba.expand * self.hidden_size

    @property
    def dt_rank(self) -> int:  # R
        return self.mamba.time_step_rank or math.ceil(self.hidden_size / 16)


# ----------------------------------------------------------------------------- shared pieces


def segment_state(last: jax.Array, segment_ids: jax.Array):
    """Where a cached state may carry into a chunk. last [B]: the row's last nonzero segment id
    before the chunk (0: none yet); segment_ids [B T]. Returns (reset [B]: the chunk's first
    nonzero id starts a new segment, so the cached state must not carry; the new last id [B])."""
    real = segment_ids != 0
    t = segment_ids.shape[1]
    first = jnp.take_along_axis(segment_ids, jnp.argmax(real, axis=1)[:, None], axis=1)[:, 0]
    final = jnp.take_along_axis(segment_ids, (t - 1 - jnp.argmax(real[:, ::-1], axis=1))[:, None],
                                axis=1)[:, 0]
    any_real = jnp.any(real, axis=1)
    reset = any_real & (last != 0) & (first != last)
    return reset, jnp.where(any_real, final, last).astype(jnp.int32)


def causal_conv(x, window, window_ids, segment_ids, kernel, bias):
    """Depthwise causal conv of new inputs x [B T C] after `window` [B W-1 C], the W-1 previous
    inputs, with their ids `window_ids` [B W-1]: kernel [W C] (tap W-1 reads the current token),
    bias [C] or None. With `segment_ids` None every tap is read (training without packing);
    otherwise tap j reads its input only when its id equals the token's nonzero id. Returns the
    pre-activation output [B T C] float32 and the new window and ids (the last W-1 inputs)."""
    w, t = kernel.shape[0], x.shape[1]
    kernel = kernel.astype(jnp.float32)
    full = jnp.concatenate([window.astype(x.dtype), x], axis=1)  # [B W-1+T C]
    ids = None if segment_ids is None else jnp.concatenate([window_ids, segment_ids], axis=1)
    out = jnp.zeros(x.shape, jnp.float32)
    for j in range(w):
        tap = full[:, j:j + t].astype(jnp.float32)
        if ids is not None:
            keep = (ids[:, j:j + t] == segment_ids) & (segment_ids != 0)
            tap = jnp.where(keep[..., None], tap, 0.0)
        out = out + tap * kernel[j]
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out, full[:, t:], None if ids is None else ids[:, t:]


def sequence_parallel(kernels: KernelConfig, cache) -> bool:
    """A training pass (no cache) with the sequence sharded over a `seq` axis of size > 1: the
    layout is zigzag (device r holds chunks r and 2W-1-r, as the data pipeline lays out every
    context-parallel batch), whichever attention mode (`ring`, `allgather`) the model runs."""
    return cache is None and kernels.context_parallel != "none" and mesh_axis_size(SEQ_AXIS) > 1


def seq_shard_map(fn, sharded, replicated):
    """fn(*sharded, *replicated) inside shard_map over the current mesh: `sharded` arrays
    [B T ...] (None passes through) split over batch (data, fsdp) and `seq`, `replicated` whole
    on every device; fn returns one [B T ...] array, sharded the same way."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = logical_to_mesh_spec(("batch",), (sharded[0].shape[0],), mesh)[0]
    present = [i for i, a in enumerate(sharded) if a is not None]

    def local(*args):
        full = [None] * len(sharded)
        for i, a in zip(present, args[:len(present)]):
            full[i] = a
        return fn(*full, *args[len(present):])

    specs = (P(batch, SEQ_AXIS),) * len(present) + (P(),) * len(replicated)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(batch, SEQ_AXIS),
                         check_vma=False)(*[sharded[i] for i in present], *replicated)


def sharded_conv(x, segment_ids, kernel, bias):
    """`causal_conv` of a training pass whose sequence is sharded over `seq` (zigzag): each of a
    device's two pieces reads the W-1 inputs before it from the device holding the previous
    piece (`conv_halo`; zeros and id 0 before the sequence start). x [B T C] -> [B T C]."""
    halo = kernel.shape[0] - 1
    if segment_ids is None:
        segment_ids = jnp.ones(x.shape[:2], jnp.int32)

    def local(x, seg, kernel, bias):
        half = x.shape[1] // 2
        if halo:
            win = conv_halo(x, halo, axis_name=SEQ_AXIS, layout="zigzag")  # [B 2 W-1 C]
            ids = conv_halo(seg, halo, axis_name=SEQ_AXIS, layout="zigzag")  # [B 2 W-1]
        else:
            win, ids = x[:, None, :0].repeat(2, 1), seg[:, None, :0].repeat(2, 1)
        outs = [causal_conv(x[:, i * half:(i + 1) * half], win[:, i], ids[:, i],
                            seg[:, i * half:(i + 1) * half], kernel, bias)[0] for i in range(2)]
        return jnp.concatenate(outs, axis=1)

    if bias is None:
        return seq_shard_map(lambda x, s, k: local(x, s, k, None), [x, segment_ids], [kernel])
    return seq_shard_map(local, [x, segment_ids], [kernel, bias])


class CausalConv(nn.Module):
    """The conv's parameters (HF `conv1d`: kernel [W C], bias [C]) applied by `causal_conv`, or
    by `sharded_conv` when `sharded` (a sequence-parallel training pass; no window returned).
    `axis`: the channels' logical axis (Mamba1's are the inner width, `ssm_inner`)."""

    channels: int
    width: int
    use_bias: bool = True
    axis: str = "ssm_conv"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, window, window_ids, segment_ids, sharded: bool = False):
        w, c = self.width, self.channels
        bound = 1.0 / math.sqrt(w)  # torch's Conv1d default for a depthwise kernel
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, ("conv_width", self.axis)),
                            (w, c), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(init, (self.axis,)), (c,),
                              self.param_dtype)
        if sharded:
            return sharded_conv(x, segment_ids, kernel, bias), None, None
        return causal_conv(x, window, window_ids, segment_ids, kernel, bias)


def inverse_softplus_dt(key, shape, dtype, lo=1e-3, hi=0.1, floor=1e-4):
    """dt bias init: softplus^-1 of dt drawn log-uniform in [lo, hi] (the Mamba papers' init)."""
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (math.log(hi) - math.log(lo))
                 + math.log(lo))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class DtProj(nn.Module):
    """dt_low [B T R] -> dt [B T E] float32 before the softplus: kernel [R E] (uniform in
    +-R^-1/2) and the dt bias [E] (`inverse_softplus_dt`), HF `dt_proj`."""

    rank: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        bound = self.rank ** -0.5
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        w = self.param("kernel", nn.with_logical_partitioning(init, ("ssm_rank", "ssm_inner")),
                       (self.rank, self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(inverse_softplus_dt,
                                                              ("ssm_inner",)),
                          (self.features,), self.param_dtype)
        y = jnp.einsum("btr,re->bte", x.astype(self.dtype), w.astype(self.dtype),
                       preferred_element_type=jnp.float32)  # [B T R] x [R E] -> [B T E]
        return y + bias.astype(jnp.float32)


def conv_window(cache, x, segment_ids, width: int):
    """(window [B W-1 C], its ids [B W-1], segment ids [B T] for the conv) of a call: the cache's,
    or zeros (ids 0: nothing before the row) for a training pass."""
    if cache is not None:
        return cache.conv, cache.conv_segment_ids, segment_ids
    b, _, c = x.shape
    return (jnp.zeros((b, width - 1, c), x.dtype), jnp.zeros((b, width - 1), jnp.int32),
            segment_ids)


# ----------------------------------------------------------------------------- cache


@struct.dataclass
class MambaCache:
    """conv [B W-1 E]: the last W-1 conv inputs (oldest first), conv_segment_ids [B W-1] (0 =
    empty or padding); ssm [B E Z] float32; segment [B] int32: the row's last nonzero segment
    id (0 before any token)."""

    conv: jax.Array
    conv_segment_ids: jax.Array
    ssm: jax.Array
    segment: jax.Array

    @classmethod
    def init(cls, cfg: MambaLayerConfig, batch: int, max_len: int, dtype) -> MambaCache:
        """`max_len` is accepted for the common cache signature and ignored: the size is fixed."""
        del max_len
        e, w = cfg.inner_size, cfg.mamba.conv_kernel
        return cls(conv=jnp.zeros((batch, w - 1, e), dtype),
                   conv_segment_ids=jnp.zeros((batch, w - 1), jnp.int32),
                   ssm=jnp.zeros((batch, e, cfg.mamba.state_size), jnp.float32),
                   segment=jnp.zeros((batch,), jnp.int32))

    @staticmethod
    def logical_axes(cfg: MambaLayerConfig) -> MambaCache:
        return MambaCache(conv=("batch", "conv_width", "ssm_inner"),
                          conv_segment_ids=("batch", "conv_width"),
                          ssm=("batch", "ssm_inner", "ssm_state"), segment=("batch",))


# ----------------------------------------------------------------------------- the mixer


class MambaMixer(nn.Module):
    """Mamba1: (x [B T D], positions [B T] (unused: no RoPE), cache, segment_ids [B T]) ->
    (y [B T D], cache). Parameter names follow HF `MambaMixer` (in_proj, conv1d, x_proj,
    dt_proj, A_log, D, out_proj)."""

    cfg: MambaLayerConfig
    kernels: KernelConfig = KernelConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Hidden, positions: Positions, cache: MambaCache | None = None,
                 segment_ids: SegmentIds | None = None) -> tuple[Hidden, MambaCache | None]:
        del positions
        c, m = self.cfg, self.cfg.mamba
        d, e, n, g, r = c.hidden_size, c.inner_size, m.state_size, m.n_groups, c.dt_rank
        b, t, _ = x.shape
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if cache is not None and segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        xz = Linear((d,), (2, e), ("embed", "ssm_split", "ssm_inner"), use_bias=m.use_bias,
                    name="in_proj", **kw)(x)  # [B T D] -> [B T 2 E]
        xs, z = xz[:, :, 0], xz[:, :, 1]
        sharded = sequence_parallel(self.kernels, cache)
        window, window_ids, conv_ids = conv_window(cache, xs, segment_ids, m.conv_kernel)
        conv, window, window_ids = CausalConv(e, m.conv_kernel, m.use_conv_bias, "ssm_inner",
                                              name="conv1d", **kw)(xs, window, window_ids,
                                                                   conv_ids, sharded)
        u = nn.silu(conv).astype(self.dtype)  # [B T E]
        proj = Linear((e,), (r + 2 * g * n,), ("ssm_inner", "ssm_proj"), name="x_proj", **kw)(u)
        dt_low, bmat, cmat = jnp.split(proj, [r, r + g * n], axis=-1)
        dt = DtProj(r, e, name="dt_proj", **kw)(dt_low)  # [B T R] -> [B T E] float32
        delta = jax.nn.softplus(dt)
        a_log = self.param("A_log", nn.with_logical_partitioning(
            lambda k, s, dtype: jnp.broadcast_to(jnp.log(jnp.arange(1, s[1] + 1, dtype=dtype)), s),
            ("ssm_inner", "ssm_state")), (e, n), self.param_dtype)
        dskip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("ssm_inner",)),
                           (e,), self.param_dtype)
        a = -jnp.exp(a_log.astype(jnp.float32))  # [E Z]
        bmat, cmat = bmat.reshape(b, t, g, n), cmat.reshape(b, t, g, n)
        impl = self.kernels.ssm_scan
        if sharded:  # local scans from zero, shard states combined, outputs corrected
            y = seq_shard_map(lambda u, dl, bm, cm, seg, a, dk: sequence_selective_scan(
                u, dl, a, bm, cm, D=dk, segment_ids=seg, axis_name=SEQ_AXIS, layout="zigzag",
                implementation=impl)[0], [u, delta, bmat, cmat, segment_ids], [a, dskip])
        elif cache is None:
            y, _ = selective_scan(u, delta, a, bmat, cmat, D=dskip, segment_ids=segment_ids,
                                  implementation=impl)
        else:
            reset, last = segment_state(cache.segment, segment_ids)
            state = jnp.where(reset[:, None, None], 0.0, cache.ssm)
            if t == 1:
                y, state = recurrence_step(u, delta, a, bmat, cmat, dskip, state, segment_ids)
            else:
                y, state = selective_scan(u, delta, a, bmat, cmat, D=dskip, initial_state=state,
                                          segment_ids=segment_ids, implementation=impl)
            cache = MambaCache(conv=window.astype(cache.conv.dtype), conv_segment_ids=window_ids,
                               ssm=state, segment=last)
        y = (y.astype(jnp.float32) * nn.silu(z.astype(jnp.float32))).astype(self.dtype)
        out = Linear((e,), (d,), ("ssm_inner", "embed"), use_bias=m.use_bias, name="out_proj",
                     **kw)(y)  # [B T E] -> [B T D]
        return out, cache


def recurrence_step(u, delta, a, bmat, cmat, dskip, state, segment_ids):
    """One token (T = 1) of the selective scan: u, delta [B 1 E], a [E Z], B, C [B 1 G Z],
    state [B E Z] float32 -> (y [B 1 E], state). A padding token (id 0) leaves the state as it
    is. Decode runs this instead of the scan kernel: one step needs no chunking."""
    e, g = u.shape[2], bmat.shape[2]
    uf, df = u[:, 0].astype(jnp.float32), delta[:, 0]
    bm = jnp.repeat(bmat[:, 0].astype(jnp.float32), e // g, axis=1)  # [B E Z]
    cm = jnp.repeat(cmat[:, 0].astype(jnp.float32), e // g, axis=1)
    new = state * jnp.exp(df[..., None] * a) + (df * uf)[..., None] * bm
    new = jnp.where((segment_ids[:, 0] != 0)[:, None, None], new, state)
    y = jnp.einsum("bez,bez->be", new, cm) + uf * dskip.astype(jnp.float32)  # [B E]
    return y[:, None].astype(u.dtype), new


# ----------------------------------------------------------------------------- spec


def hf_tensors(cfg: MambaLayerConfig) -> tuple[HFTensor, ...]:
    """HF `MambaMixer` tensors of one layer, relative to the layer prefix (`mixer.*`)."""
    m = cfg.mamba
    d, e, n, g, r, w = (cfg.hidden_size, cfg.inner_size, m.state_size, m.n_groups, cfg.dt_rank,
                        m.conv_kernel)
    out = [HFTensor("mixer.A_log", ("mixer", "A_log"), (e, n), (e, n), False),
           HFTensor("mixer.D", ("mixer", "D"), (e,), (e,), False),
           HFTensor("mixer.conv1d.weight", ("mixer", "conv1d", "kernel"), (e, 1, w), (w, e), True)]
    if m.use_conv_bias:
        out.append(HFTensor("mixer.conv1d.bias", ("mixer", "conv1d", "bias"), (e,), (e,), False))
    out += [HFTensor("mixer.dt_proj.weight", ("mixer", "dt_proj", "kernel"), (e, r), (r, e), True),
            HFTensor("mixer.dt_proj.bias", ("mixer", "dt_proj", "bias"), (e,), (e,), False),
            HFTensor("mixer.in_proj.weight", ("mixer", "in_proj", "kernel"), (2 * e, d),
                     (d, 2, e), True)]
    if m.use_bias:
        out.append(HFTensor("mixer.in_proj.bias", ("mixer", "in_proj", "bias"), (2 * e,),
                            (2, e), False))
    out += [HFTensor("mixer.out_proj.weight", ("mixer", "out_proj", "kernel"), (d, e), (e, d),
                     True)]
    if m.use_bias:
        out.append(HFTensor("mixer.out_proj.bias", ("mixer", "out_proj", "bias"), (d,), (d,),
                            False))
    out.append(HFTensor("mixer.x_proj.weight", ("mixer", "x_proj", "kernel"), (r + 2 * g * n, e),
                        (e, r + 2 * g * n), True))
    return tuple(out)


def flops_per_token(cfg: MambaLayerConfig, seq_len: int) -> float:
    """The scan per token and channel pair (E x Z): decay exp(dt A) and its product with the
    state, dt B x, the add, and C . h (2): about 7 FLOPs; the conv: 2 W per channel. Constant in
    seq_len."""
    del seq_len
    e = cfg.inner_size
    return 7.0 * e * cfg.mamba.state_size + 2.0 * e * cfg.mamba.conv_kernel


SPEC = MixerSpec(
    kind="mamba",
    module=MambaMixer,
    cache=MambaCache,
    config_cls=MambaLayerConfig,
    config_field="mamba",
    context_limited=False,  # no positions: a recurrence over any length
    context_parallel=("ring", "allgather"),  # either mode: the zigzag-sharded sequence scan
    uses_rope=False,
    padding="state_reset",
    cache_growth="constant",
    hf_tensors=hf_tensors,
    flops_per_token=flops_per_token,
)

__all__ = ["SEQ_AXIS", "SPEC", "CausalConv", "MambaCache", "MambaConfig", "MambaLayerConfig",
           "MambaMixer", "causal_conv", "conv_window", "hf_tensors", "inverse_softplus_dt",
           "segment_state", "seq_shard_map", "sequence_parallel", "sharded_conv"]
