"""The chunked SSD (Mamba2) for NVIDIA GPUs in Pallas (Triton backend), forward and backward.

Backend: Pallas' Triton backend, for the reason flash_attention/pallas_gpu.py gives (the same
kernel body runs on CPU under `interpret=True`, `pallas_interpret`, which is what CI tests). Not run
on a GPU yet (none in the writing session); `test_ssm_scan` lowers it for CUDA with `jax.export`.

What runs as kernels: the chunk-local work of reference.ssd_chunked, i.e. `ChunkOps`:
  - `jaxllama_ssd_state_{fwd,bwd}_gpu`: per (batch, head, chunk) the chunk's final state
    S [P N] = (coef x)^T B, and its backward;
  - `jaxllama_ssd_output_{fwd,bwd}_gpu`: per (batch, head, chunk) the L x L intra-chunk term and
    the state-to-output term, and its backward (recomputing the L x L tile rather than storing it).
The O(S / L) inter-chunk recurrence, the cumulative decays and the D term stay in XLA (reference
glue, shared with every implementation), and JAX differentiates that glue; each kernel pair is a
`custom_vjp` whose backward is the hand-derived `*_block_bwd` of reference.py. Each program reads
the B/C group of its head through the index map (ngroups without repeats); dB and dC leave per head
and are summed over the heads of a group in XLA.

Mamba1 (`selective_scan`): `selective_fn` runs pallas_selective.py's kernels with this backend
(`jaxllama_selective_{fwd,bwd}_gpu`: a sequential scan per channel block, chunk checkpoints and a
recomputing backward).

Layout: chunk tiles are [L, P] slices of head-major copies [B H S P] (XLA transposes once per call),
vectors are [L, 1] columns, cum and run also [1, L] rows. Triton needs power-of-two tiles and
`tl.dot` dims of at least 16: P and N are zero-padded up to a power of two >= 16 (64 and 128, the
usual sizes, are untouched), and the chunk must be a power of two >= 16. Matmuls take float32
operands (the glue is float32); bf16 operands are a later speed-up to measure on hardware.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxllama.kernels._common import pad_to
from jaxllama.kernels.ssm_scan import reference
from jaxllama.kernels.ssm_scan.reference import ChunkOps

MIN_DOT = 16


class Backend(NamedTuple):
    """What differs between the GPU and TPU builds of these kernels: the kernel-name suffix, the
    compiler params, the interpret flag (bool for Triton, `pltpu.InterpretParams` or None for
    Mosaic), and whether P and N are padded to powers of two (Triton tiles)."""

    suffix: str
    params: Any
    interpret: Any
    pad_pow2: bool


def _pow2(x: int) -> int:
    p = MIN_DOT
    while p < x:
        p *= 2
    return p


def _check_chunk(L: int):
    if L < MIN_DOT or L & (L - 1):
        raise ValueError(f"ssd_scan: the Triton kernels need chunk_size a power of two >= "
                         f"{MIN_DOT}, got {L}")


# ----------------------------------------------------------------------------- kernels


def _state_fwd_kernel(x_ref, coef_ref, b_ref, s_ref):
    s_ref[...] = reference.state_block(x_ref[...], coef_ref[...], b_ref[...])


def _state_bwd_kernel(x_ref, coef_ref, b_ref, ds_ref, dx_ref, dcoef_ref, db_ref):
    dx, dcoef, db = reference.state_block_bwd(x_ref[...], coef_ref[...], b_ref[...], ds_ref[...])
    dx_ref[...], dcoef_ref[...], db_ref[...] = dx, dcoef, db


def _output_fwd_kernel(*refs):
    *ins, y_ref = refs
    y_ref[...] = reference.output_block(*(r[...] for r in ins))


def _output_bwd_kernel(*refs):
    ins, outs = refs[:11], refs[11:]
    for ref, val in zip(outs, reference.output_block_bwd(*(r[...] for r in ins))):
        ref[...] = val


# ----------------------------------------------------------------------------- calls


class _Geo:
    """Static sizes: batch, heads, groups, padded length sp, chunk L, chunks c, padded P and N."""

    def __init__(self, x, B, L: int):
        self.b, self.h, self.sp, self.p = x.shape
        self.g, self.n = B.shape[1], B.shape[3]
        self.L, self.c, self.r = L, self.sp // L, self.h // self.g


def _specs(geo: _Geo, kinds):
    """BlockSpecs over grid (batch, head, chunk) by kind: `tile` [L, last] of a [B H S *] array,
    `group` the same of a [B G S *] array (head -> its group), `row` [1, L] of [B H 1 S],
    `brow`/`bcol` the per-batch run [1, L] / [L, 1], `state` [P N] of [B H C P N]."""
    L, r = geo.L, geo.r
    table = {
        "tile": lambda w: pl.BlockSpec((None, None, L, w), lambda b, h, c: (b, h, c, 0)),
        "group": lambda w: pl.BlockSpec((None, None, L, w), lambda b, h, c: (b, lax.div(h, r), c, 0)),
        "row": lambda w: pl.BlockSpec((None, None, 1, L), lambda b, h, c: (b, h, 0, c)),
        "bcol": lambda w: pl.BlockSpec((None, L, 1), lambda b, h, c: (b, c, 0)),
        "brow": lambda w: pl.BlockSpec((None, 1, L), lambda b, h, c: (b, 0, c)),
        "state": lambda w: pl.BlockSpec((None, None, None, geo.p, geo.n),
                                        lambda b, h, c: (b, h, c, 0, 0)),
    }
    return [table[k](w) for k, w in kinds]


def _call(kernel, name, geo: _Geo, be: Backend, ins, in_kinds, outs):
    """pallas_call over grid (batch, head, chunk); outs: (shape, kind, width) per output."""
    return pl.pallas_call(
        kernel, grid=(geo.b, geo.h, geo.c),
        in_specs=_specs(geo, in_kinds),
        out_specs=_specs(geo, [(k, w) for _, k, w in outs]),
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s, _, _ in outs],
        compiler_params=be.params, interpret=be.interpret,
        name=f"jaxllama_ssd_{name}_{be.suffix}")(*ins)


def _group_sum(d, geo: _Geo):
    """[B H S N] per-head gradient -> [B G S N] (the heads of a group share B, C)."""
    return d.reshape(geo.b, geo.g, geo.r, *d.shape[2:]).sum(2)


@functools.cache
def kernels(be: Backend, L: int):
    """The two custom_vjp chunk ops on the kernel layout (module docstring) for chunk L."""

    @jax.custom_vjp
    def state(x, coef, B):
        geo = _Geo(x, B, L)
        (s,) = _call(_state_fwd_kernel, "state_fwd", geo, be,
                     (x, coef, B), [("tile", geo.p), ("tile", 1), ("group", geo.n)],
                     [((geo.b, geo.h, geo.c, geo.p, geo.n), "state", 0)])
        return s

    def state_bwd(res, ds):
        x, coef, B = res
        geo = _Geo(x, B, L)
        dx, dcoef, db = _call(
            _state_bwd_kernel, "state_bwd", geo, be, (x, coef, B, ds),
            [("tile", geo.p), ("tile", 1), ("group", geo.n), ("state", 0)],
            [(x.shape, "tile", geo.p), (coef.shape, "tile", 1),
             ((geo.b, geo.h, geo.sp, geo.n), "tile", geo.n)])
        return dx, dcoef, _group_sum(db, geo)

    state.defvjp(lambda *a: (state(*a), a), state_bwd)

    out_kinds = lambda geo: [("tile", geo.p), ("tile", 1), ("tile", 1), ("row", 0), ("bcol", 0),
                             ("brow", 0), ("group", geo.n), ("group", geo.n), ("tile", 1),
                             ("state", 0)]

    @jax.custom_vjp
    def output(x, dt, cum_c, cum_r, run_c, run_r, B, C, s, H):
        geo = _Geo(x, B, L)
        (y,) = _call(_output_fwd_kernel, "output_fwd", geo, be,
                     (x, dt, cum_c, cum_r, run_c, run_r, B, C, s, H), out_kinds(geo),
                     [(x.shape, "tile", geo.p)])
        return y

    def output_bwd(res, dy):
        x, dt, cum_c, cum_r, run_c, run_r, B, _, s, H = res
        geo = _Geo(x, B, L)
        per_head = (geo.b, geo.h, geo.sp, geo.n)
        dx, ddt, dcc, dcr, db, dc, ds, dh = _call(
            _output_bwd_kernel, "output_bwd", geo, be, (*res, dy),
            [*out_kinds(geo), ("tile", geo.p)],
            [(x.shape, "tile", geo.p), (dt.shape, "tile", 1), (cum_c.shape, "tile", 1),
             (cum_r.shape, "row", 0), (per_head, "tile", geo.n), (per_head, "tile", geo.n),
             (s.shape, "tile", 1), (H.shape, "state", 0)])
        zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
        return (dx, ddt, dcc, dcr, zero(run_c), zero(run_r), _group_sum(db, geo),
                _group_sum(dc, geo), ds, dh)

    output.defvjp(lambda *a: (output(*a), a), output_bwd)
    return state, output


# ----------------------------------------------------------------------------- ChunkOps


def _heads(a, width: int | None):
    """[B C L H (W)] -> [B H C*L W] (W zero-padded to `width`; no W: a [.., 1] column)."""
    b, c, L, h = a.shape[:4]
    a = jnp.moveaxis(a, 3, 1).reshape(b, h, c * L, *a.shape[4:])
    return a[..., None] if width is None else pad_to(a, {3: width})


def chunk_ops(be: Backend) -> ChunkOps:
    """reference.ChunkOps running the kernels of backend `be`."""
    widths = _pow2 if be.pad_pow2 else (lambda w: w)

    def state(x, coef, B):
        L, p = x.shape[2], x.shape[4]
        n = B.shape[-1]
        k_state, _ = kernels(be, L)
        s = k_state(_heads(x, widths(p)), _heads(coef, None), _heads(B, widths(n)))
        return jnp.moveaxis(s[..., :p, :n], 2, 1)

    def output(x, dt, cum, run, B, C, s_out, H_in):
        b, c, L, h, p = x.shape
        n = B.shape[-1]
        _, k_output = kernels(be, L)
        cum_h = _heads(cum, None)
        run_b = run.reshape(b, c * L).astype(jnp.int32)
        H = pad_to(jnp.moveaxis(H_in, 2, 1), {3: widths(p), 4: widths(n)})
        y = k_output(_heads(x, widths(p)), _heads(dt, None), cum_h, jnp.swapaxes(cum_h, 2, 3),
                     run_b[..., None], run_b[:, None], _heads(B, widths(n)),
                     _heads(C, widths(n)), _heads(s_out, None), H)
        return jnp.moveaxis(y[..., :p].reshape(b, h, c, L, p), 1, 3)

    return ChunkOps(state, output)


def ssd_fn(interpret: bool):
    """ssd(x, dt, A, B, C, D, initial_state, segment_ids, chunk) through the Triton kernels."""
    ops = chunk_ops(Backend("gpu", pltriton.CompilerParams(num_warps=4, num_stages=2),
                            bool(interpret), True))

    def ssd(x, dt, A, B, C, D, initial_state, segment_ids, chunk):
        _check_chunk(chunk)
        return reference.ssd_chunked(x, dt, A, B, C, D, initial_state, segment_ids, chunk, ops)
    return ssd


def selective_fn(interpret: bool):
    """selective(u, delta, A, B, C, D, initial_state, segment_ids, chunk) through the Triton
    Mamba1 kernels (pallas_selective.py)."""
    from jaxllama.kernels.ssm_scan import heuristics, pallas_selective

    return pallas_selective.selective_fn(pallas_selective.Backend(
        "gpu", pltriton.CompilerParams(num_warps=2, num_stages=1), bool(interpret),
        heuristics.gpu_selective_block, True))
