"""Flash attention for NVIDIA GPUs in Pallas (Triton backend), forward and backward.

Backend: Pallas' Triton backend, chosen explicitly with `pltriton.CompilerParams` (JAX >= 0.9
defaults `pallas_call` on GPU to Mosaic GPU). Why not Mosaic GPU, which the NVIDIA machines' JAX
0.11 prefers and which deprecates Triton: this project needs the GPU kernel body to run on CPU under
`interpret=True` (`pallas_interpret`, what CI tests). A Mosaic GPU Hopper kernel is written with
warpgroup primitives (wgmma on shared-memory refs, TMA copies, mbarriers) that the generic
interpreter cannot run, and Mosaic GPU no longer accepts `pallas_call` bodies of plain jnp (it is
deprecated in favour of `plgpu.kernel`); JAX 0.10.2's separate GPU interpreter fails even on JAX's
own Mosaic GPU attention example (`NotImplementedError: run_state`, checked here). The Triton
backend lowers exactly the portable body below (jnp on blocks loaded from refs, `lax.dot_general`,
`fori_loop`, `cond`), so CPU tests exercise the code that runs on the GPU. It still ships in 0.11
(deprecated, with a warning). The cost: Triton-generated Hopper attention sits well below the
wgmma/TMA warp-specialized kernels (cuDNN, tokamax); reaching the issue's 640 TFLOP/s needs a
Mosaic GPU kernel developed on the hardware. Not run on a GPU yet (none in the writing session).

Layout: q [B T N H], k [B S K H], v [B S K U] stay in HBM as given, padded to whole blocks on the
sequence axes. Head dims: Triton needs every loaded tile to have a power-of-two size (Pallas'
Triton lowering rejects others) and `tl.dot` a contraction of at least 16, but not the array
itself. So a head dim is padded only to a multiple of 16 (192, 576, 512 and 128 are not padded at
all) and split into power-of-two pieces, largest first (`head_pieces`: 192 = 128 + 64, 576 =
512 + 64); the kernels load, multiply and store piece by piece (scores are the sum of the pieces'
products; the output accumulator is one tile per value piece). Padding 576 to the next power of
two would have cost 78% more key bytes and multiply-adds.

Forward and dq: one program per (batch, query head, query block) looping over the key blocks its
query block can see (`mask.Tables`: the causal/window band; offsets are traced scalars read from a
table). dk/dv: one program per (batch, kv head, key block) looping over the G query heads of its
group and the query blocks that see the key block, so GQA gradients need no atomics and no
repeated K/V. Key blocks whose segment range is disjoint from the query block's are skipped with a
`cond`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxllama.kernels._common import F32, NEG_INF, cdiv, pad_to, round_up
from jaxllama.kernels.flash_attention import heuristics
from jaxllama.kernels.flash_attention.mask import Tables, kernel_tables, visible
from jaxllama.kernels.flash_attention.reference import (
    Aux,
    Static,
    flash_attention_fn,
    probs_and_dscores,
    row_delta,
    softmax_finish,
    softmax_step,
)

NT = (((1,), (1,)), ((), ()))  # a [R, H] x b [C, H] -> [R, C]
TN = (((0,), (0,)), ((), ()))  # a [R, C] x b [R, H] -> [C, H]
NN = (((1,), (0,)), ((), ()))  # a [R, C] x b [C, H] -> [R, H]
MIN_DOT = 16  # tl.dot's smallest dimension


def head_pieces(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, size) power-of-two pieces, largest first, covering d rounded up to MIN_DOT."""
    dp, pieces, off = round_up(d, MIN_DOT), [], 0
    for bit in reversed(range(dp.bit_length())):
        if dp & (1 << bit):
            pieces.append((off, 1 << bit))
            off += 1 << bit
    return tuple(pieces)


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _load(ref, idx, pieces):
    """The pieces of ref[*idx, :] along the last (head) axis: a tuple of power-of-two tiles."""
    return tuple(ref[(*idx, pl.ds(off, size))] for off, size in pieces)


def _store(ref, idx, tiles, pieces):
    for (off, size), x in zip(pieces, tiles):
        ref[(*idx, pl.ds(off, size))] = x.astype(ref.dtype)


def _dot_pieces(a, b, dims):
    """sum over pieces of a_i . b_i: a contraction over a split head axis."""
    return functools.reduce(lambda x, y: x + y, (_dot(x, y, dims) for x, y in zip(a, b)))


def _config(static: Static, t: int, s: int, h: int, u: int, backward: bool):
    opts = dict(static.options)
    blocks = heuristics.gpu_blocks(t, s, h, u, backward)
    if opts.get("blocks"):  # tests force small blocks to get many of them
        blocks = blocks._replace(block_q=opts["blocks"][0], block_k=opts["blocks"][1])
    return blocks, bool(opts.get("interpret", False))


def _ok(cols, offs_ref, i, j, bq: int, bk: int, kv_len: int, qseg, kseg):
    """Visibility [bq, bk] of key block j from query block i, segments included."""
    q_pos = offs_ref[0] + i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
    k_idx = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
    ok = visible(cols, q_pos, k_idx, offs_ref[1], kv_len)
    if qseg is not None:
        ok = ok & (qseg[:, None] == kseg[None, :])
    return ok


def _skip_disjoint(seg_refs, i, j, fn, carry):
    """fn(carry) unless query block i and key block j share no segment (then carry unchanged)."""
    if seg_refs is None:
        return fn(carry)
    qmin, qmax, kmin, kmax = seg_refs
    live = (qmin[i] <= kmax[j]) & (kmin[j] <= qmax[i])
    return lax.cond(live, fn, lambda c: c, carry)


def _split(refs, n_out: int, segments: bool):
    """(segment refs (q ids, kv ids, q min, q max, kv min, kv max) or None, output refs)."""
    ins, outs = refs[:len(refs) - n_out], refs[len(refs) - n_out:]
    return (ins if segments else None), outs


# ----------------------------------------------------------------------------- kernels
# hq, hu: the (offset, size) pieces of the key and value head dims (`head_pieces`).


def _forward_kernel(lo_ref, hi_ref, offs_ref, q_ref, k_ref, v_ref, *refs, cols, scale, bq, bk,
                    kv_len, hq, hu):
    segs, (o_ref, lse_ref) = _split(refs, 2, cols.segments)
    i = pl.program_id(2)
    lo = lo_ref[i]
    q = _load(q_ref, (slice(None),), hq)  # pieces of [bq, H]
    qseg = None if segs is None else segs[0][...]

    def body(it, carry):
        j = lo + it

        def visit(carry):
            rows = pl.ds(j * bk, bk)
            k, v = _load(k_ref, (rows,), hq), _load(v_ref, (rows,), hu)  # [bk, H], [bk, U]
            kseg = None if segs is None else segs[1][rows]
            ok = _ok(cols, offs_ref, i, j, bq, bk, kv_len, qseg, kseg)
            pv = lambda p: tuple(_dot(p.astype(x.dtype), x, NN) for x in v)
            return softmax_step(*carry, _dot_pieces(q, k, NT) * scale, ok, pv)

        return _skip_disjoint(None if segs is None else segs[2:], i, j, visit, carry)

    init = (jnp.full((bq, 1), NEG_INF, F32), jnp.zeros((bq, 1), F32),
            tuple(jnp.zeros((bq, size), F32) for _, size in hu))
    out, lse = softmax_finish(*lax.fori_loop(0, hi_ref[i] - lo, body, init))
    _store(o_ref, (slice(None),), out, hu)
    lse_ref[...] = lse.reshape(bq)


def _dq_kernel(lo_ref, hi_ref, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cols, scale, bq, bk, kv_len, hq, hu):
    segs, (dq_ref,) = _split(refs, 1, cols.segments)
    i = pl.program_id(2)
    lo = lo_ref[i]
    q, do = _load(q_ref, (slice(None),), hq), _load(do_ref, (slice(None),), hu)
    lse, delta = lse_ref[...].reshape(bq, 1), delta_ref[...].reshape(bq, 1)
    qseg = None if segs is None else segs[0][...]

    def body(it, dq):
        j = lo + it

        def visit(dq):
            rows = pl.ds(j * bk, bk)
            k, v = _load(k_ref, (rows,), hq), _load(v_ref, (rows,), hu)
            kseg = None if segs is None else segs[1][rows]
            ok = _ok(cols, offs_ref, i, j, bq, bk, kv_len, qseg, kseg)
            _, ds = probs_and_dscores(_dot_pieces(q, k, NT) * scale, ok, lse,
                                      _dot_pieces(do, v, NT), delta)
            return tuple(a + _dot(ds.astype(x.dtype), x, NN) for a, x in zip(dq, k))

        return _skip_disjoint(None if segs is None else segs[2:], i, j, visit, dq)

    init = tuple(jnp.zeros((bq, size), F32) for _, size in hq)
    dq = lax.fori_loop(0, hi_ref[i] - lo, body, init)
    _store(dq_ref, (slice(None),), tuple(x * scale for x in dq), hq)


def _dkv_kernel(lo_ref, hi_ref, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                cols, scale, bq, bk, groups, kv_len, hq, hu):
    segs, (dk_ref, dv_ref) = _split(refs, 2, cols.segments)
    j = pl.program_id(2)
    k, v = _load(k_ref, (slice(None),), hq), _load(v_ref, (slice(None),), hu)  # [bk, H], [bk, U]
    kseg = None if segs is None else segs[1][...]

    def head(g, carry):
        def body(i, carry):
            def visit(carry):
                dk, dv = carry
                rows = pl.ds(i * bq, bq)
                q, do = _load(q_ref, (rows, g), hq), _load(do_ref, (rows, g), hu)
                lse, delta = lse_ref[g, rows].reshape(bq, 1), delta_ref[g, rows].reshape(bq, 1)
                qseg = None if segs is None else segs[0][rows]
                ok = _ok(cols, offs_ref, i, j, bq, bk, kv_len, qseg, kseg)
                p, ds = probs_and_dscores(_dot_pieces(q, k, NT) * scale, ok, lse,
                                          _dot_pieces(do, v, NT), delta)
                return (tuple(a + _dot(ds.astype(x.dtype), x, TN) for a, x in zip(dk, q)),
                        tuple(a + _dot(p.astype(x.dtype), x, TN) for a, x in zip(dv, do)))

            return _skip_disjoint(None if segs is None else segs[2:], i, j, visit, carry)

        return lax.fori_loop(lo_ref[j], hi_ref[j], body, carry)

    zeros = lambda pieces: tuple(jnp.zeros((bk, size), F32) for _, size in pieces)
    dk, dv = lax.fori_loop(0, groups, head, (zeros(hq), zeros(hu)))
    _store(dk_ref, (slice(None),), tuple(x * scale for x in dk), hq)
    _store(dv_ref, (slice(None),), dv, hu)


# ----------------------------------------------------------------------------- wrappers


def _segment_inputs(tables: Tables, aux: Aux, tp: int, sp: int, q_spec, k_spec):
    """Inputs and BlockSpecs of the segment refs, in `_split` order (id blocks, then the per-block
    ranges whole)."""
    if tables.q_seg is None:
        return [], []
    qseg = pad_to(aux.q_segment_ids, {1: tp})
    kseg = pad_to(aux.kv_segment_ids, {1: sp})
    (qmin, qmax), (kmin, kmax) = tables.q_seg, tables.kv_seg
    full = lambda x: pl.BlockSpec((None, x.shape[1]), lambda b, *_: (b, 0))
    ranges = (qmin, qmax, kmin, kmax)
    return [qseg, kseg, *ranges], [q_spec, k_spec] + [full(x) for x in ranges]


def _table_specs(*arrays):
    return [pl.BlockSpec(a.shape, lambda *_, n=a.ndim: (0,) * n) for a in arrays]


class _Geometry:
    """Static sizes of one call: blocks, padded lengths, head pieces (hp, up: padded head dims)."""

    def __init__(self, static: Static, q, k, v, backward: bool):
        self.b, self.t, self.n, self.h = q.shape
        self.s, self.kh, self.u = k.shape[1], k.shape[2], v.shape[3]
        self.blocks, self.interpret = _config(static, self.t, self.s, self.h, self.u, backward)
        self.bq, self.bk = self.blocks.block_q, self.blocks.block_k
        self.nq, self.nk = cdiv(self.t, self.bq), cdiv(self.s, self.bk)
        self.tp, self.sp, self.g = self.nq * self.bq, self.nk * self.bk, self.n // self.kh
        self.hq, self.hu = head_pieces(self.h), head_pieces(self.u)
        self.hp, self.up = round_up(self.h, MIN_DOT), round_up(self.u, MIN_DOT)
        self.params = pltriton.CompilerParams(num_warps=self.blocks.num_warps,
                                              num_stages=self.blocks.num_stages)


def _tables(static: Static, aux: Aux, geo: _Geometry) -> Tables:
    return kernel_tables(static.cols, aux.q_offset, aux.k_offset, aux.q_segment_ids,
                         aux.kv_segment_ids, geo.t, geo.bq, geo.s, geo.bk)


def _gpu_forward(static: Static, q, k, v, aux: Aux):
    geo = _Geometry(static, q, k, v, backward=False)
    b, n, bq, tp, sp, g = geo.b, geo.n, geo.bq, geo.tp, geo.sp, geo.g
    tab = _tables(static, aux, geo)
    qp, kp = pad_to(q, {1: tp, 3: geo.hp}), pad_to(k, {1: sp, 3: geo.hp})
    vp = pad_to(v, {1: sp, 3: geo.up})
    q_spec = pl.BlockSpec((None, bq, None, geo.hp), lambda b_, n_, i: (b_, i, n_, 0))
    o_spec = pl.BlockSpec((None, bq, None, geo.up), lambda b_, n_, i: (b_, i, n_, 0))
    kv_map = lambda b_, n_, i: (b_, 0, lax.div(n_, g), 0)
    k_spec = pl.BlockSpec((None, sp, None, geo.hp), kv_map)
    v_spec = pl.BlockSpec((None, sp, None, geo.up), kv_map)
    seg_in, seg_specs = _segment_inputs(
        tab, aux, tp, sp, pl.BlockSpec((None, bq), lambda b_, n_, i: (b_, i)),
        pl.BlockSpec((None, sp), lambda b_, n_, i: (b_, 0)))
    kernel = functools.partial(_forward_kernel, cols=static.cols, scale=static.scale, bq=bq,
                               bk=geo.bk, kv_len=geo.s, hq=geo.hq, hu=geo.hu)
    out, lse = pl.pallas_call(
        kernel, grid=(b, n, geo.nq),
        in_specs=_table_specs(tab.kv_lo, tab.kv_hi, tab.offsets) + [q_spec, k_spec, v_spec]
        + seg_specs,
        out_specs=[o_spec, pl.BlockSpec((None, None, bq), lambda b_, n_, i: (b_, n_, i))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, n, geo.up), static.out_dtype),
                   jax.ShapeDtypeStruct((b, n, tp), F32)],
        compiler_params=geo.params, interpret=geo.interpret, name="jaxllama_flash_fwd_gpu",
    )(tab.kv_lo, tab.kv_hi, tab.offsets, qp, kp, vp, *seg_in)
    return out[:, :geo.t, :, :geo.u], lse[..., :geo.t]


def _gpu_backward(static: Static, q, k, v, aux: Aux, out, lse, dout, dlse):
    geo = _Geometry(static, q, k, v, backward=True)
    b, n, kh, bq, bk, tp, sp, g = geo.b, geo.n, geo.kh, geo.bq, geo.bk, geo.tp, geo.sp, geo.g
    hp, up = geo.hp, geo.up
    tab = _tables(static, aux, geo)
    qp, dop = pad_to(q, {1: tp, 3: hp}), pad_to(dout.astype(q.dtype), {1: tp, 3: up})
    kp, vp = pad_to(k, {1: sp, 3: hp}), pad_to(v, {1: sp, 3: up})
    lsep, deltap = pad_to(lse, {2: tp}), pad_to(row_delta(out, dout, dlse), {2: tp})
    common = {"cols": static.cols, "scale": static.scale, "bq": bq, "bk": bk, "kv_len": geo.s,
              "hq": geo.hq, "hu": geo.hu}

    # dq: programs (batch, query head, query block), like the forward
    q_map = lambda b_, n_, i: (b_, i, n_, 0)
    kv_map = lambda b_, n_, i: (b_, 0, lax.div(n_, g), 0)
    row_spec = pl.BlockSpec((None, None, bq), lambda b_, n_, i: (b_, n_, i))
    seg_in, seg_specs = _segment_inputs(
        tab, aux, tp, sp, pl.BlockSpec((None, bq), lambda b_, n_, i: (b_, i)),
        pl.BlockSpec((None, sp), lambda b_, n_, i: (b_, 0)))
    q_spec = pl.BlockSpec((None, bq, None, hp), q_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(b, n, geo.nq),
        in_specs=_table_specs(tab.kv_lo, tab.kv_hi, tab.offsets)
        + [q_spec, pl.BlockSpec((None, sp, None, hp), kv_map),
           pl.BlockSpec((None, sp, None, up), kv_map), pl.BlockSpec((None, bq, None, up), q_map),
           row_spec, row_spec] + seg_specs,
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct((b, tp, n, hp), q.dtype),
        compiler_params=geo.params, interpret=geo.interpret, name="jaxllama_flash_dq_gpu",
    )(tab.kv_lo, tab.kv_hi, tab.offsets, qp, kp, vp, dop, lsep, deltap, *seg_in)

    # dk, dv: programs (batch, kv head, key block) over the G query heads of the group
    group_map = lambda b_, h_, j: (b_, 0, h_, 0)
    kv_map = lambda b_, h_, j: (b_, j, h_, 0)
    k_spec, v_spec = (pl.BlockSpec((None, bk, None, d), kv_map) for d in (hp, up))
    rows_spec = pl.BlockSpec((None, g, tp), lambda b_, h_, j: (b_, h_, 0))
    seg_in, seg_specs = _segment_inputs(
        tab, aux, tp, sp, pl.BlockSpec((None, tp), lambda b_, h_, j: (b_, 0)),
        pl.BlockSpec((None, bk), lambda b_, h_, j: (b_, j)))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, groups=g, **common),
        grid=(b, kh, geo.nk),
        in_specs=_table_specs(tab.q_lo, tab.q_hi, tab.offsets)
        + [pl.BlockSpec((None, tp, g, hp), group_map), k_spec, v_spec,
           pl.BlockSpec((None, tp, g, up), group_map), rows_spec, rows_spec] + seg_specs,
        out_specs=[k_spec, v_spec],
        out_shape=[jax.ShapeDtypeStruct((b, sp, kh, hp), k.dtype),
                   jax.ShapeDtypeStruct((b, sp, kh, up), v.dtype)],
        compiler_params=geo.params, interpret=geo.interpret, name="jaxllama_flash_dkv_gpu",
    )(tab.q_lo, tab.q_hi, tab.offsets, qp, kp, vp, dop, lsep, deltap, *seg_in)
    return dq[:, :geo.t, :, :geo.h], dk[:, :geo.s, :, :geo.h], dv[:, :geo.s, :, :geo.u]


attend_gpu = flash_attention_fn(_gpu_forward, _gpu_backward)
"""attend_gpu(static, q, k, v, aux) -> (out [B T N U], lse [B N T]); static.options holds
("interpret", bool) and optionally ("blocks", (block_q, block_k))."""
