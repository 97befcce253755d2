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

Layout: q [B T N H], k, v [B S K H] stay in HBM as given (padded to whole blocks; the head dim to a
power of two). Forward and dq: one program per (batch, query head, query block) looping over the
key blocks its query block can see (`mask.Tables`: memory blocks, then the causal/window band;
offsets are traced scalars read from a table). dk/dv: one program per (batch, kv head, key block)
looping over the G query heads of its group and the query blocks that see the key block, so GQA
gradients need no atomics and no repeated K/V. Key blocks whose segment range is disjoint from the
query block's are skipped with a `cond`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxllama.kernels.flash_attention import heuristics
from jaxllama.kernels.flash_attention.mask import Tables, block_at, kernel_tables, visible
from jaxllama.kernels.flash_attention.reference import (
    NEG_INF,
    Aux,
    Static,
    flash_attention_fn,
    probs_and_dscores,
    row_delta,
    softmax_finish,
    softmax_step,
)

F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))  # a [R, H] x b [C, H] -> [R, C]
TN = (((0,), (0,)), ((), ()))  # a [R, C] x b [R, H] -> [C, H]
NN = (((1,), (0,)), ((), ()))  # a [R, C] x b [C, H] -> [R, H]


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _config(static: Static, t: int, s: int, h: int, backward: bool):
    opts = dict(static.options)
    blocks = heuristics.gpu_blocks(t, s, h, backward)
    if opts.get("blocks"):  # tests force small blocks to get many of them
        blocks = blocks._replace(block_q=opts["blocks"][0], block_k=opts["blocks"][1])
    return blocks, bool(opts.get("interpret", False))


def _pad(x, sizes: dict[int, int]):
    widths = [(0, sizes.get(a, x.shape[a]) - x.shape[a]) for a in range(x.ndim)]
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def _head_dim(h: int) -> int:
    return max(16, 1 << (h - 1).bit_length())


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


def _forward_kernel(lo_ref, hi_ref, offs_ref, q_ref, k_ref, v_ref, *refs, cols, scale, bq, bk,
                    n_mem, kv_len):
    segs, (o_ref, lse_ref) = _split(refs, 2, cols.segments)
    i = pl.program_id(2)
    lo = lo_ref[i]
    q = q_ref[...]  # [bq, Hp]
    qseg = None if segs is None else segs[0][...]

    def body(it, carry):
        j = block_at(it, n_mem, lo)

        def visit(carry):
            k, v = k_ref[pl.ds(j * bk, bk), :], v_ref[pl.ds(j * bk, bk), :]  # [bk, Hp]
            kseg = None if segs is None else segs[1][pl.ds(j * bk, bk)]
            ok = _ok(cols, offs_ref, i, j, bq, bk, kv_len, qseg, kseg)
            return softmax_step(*carry, _dot(q, k, NT) * scale, ok,
                                lambda p: _dot(p.astype(v.dtype), v, NN))

        return _skip_disjoint(None if segs is None else segs[2:], i, j, visit, carry)

    init = (jnp.full((bq, 1), NEG_INF, F32), jnp.zeros((bq, 1), F32),
            jnp.zeros((bq, q.shape[-1]), F32))
    out, lse = softmax_finish(*lax.fori_loop(0, n_mem + hi_ref[i] - lo, body, init))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(bq)


def _dq_kernel(lo_ref, hi_ref, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cols, scale, bq, bk, n_mem, kv_len):
    segs, (dq_ref,) = _split(refs, 1, cols.segments)
    i = pl.program_id(2)
    lo = lo_ref[i]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...].reshape(bq, 1), delta_ref[...].reshape(bq, 1)
    qseg = None if segs is None else segs[0][...]

    def body(it, dq):
        j = block_at(it, n_mem, lo)

        def visit(dq):
            k, v = k_ref[pl.ds(j * bk, bk), :], v_ref[pl.ds(j * bk, bk), :]
            kseg = None if segs is None else segs[1][pl.ds(j * bk, bk)]
            ok = _ok(cols, offs_ref, i, j, bq, bk, kv_len, qseg, kseg)
            _, ds = probs_and_dscores(_dot(q, k, NT) * scale, ok, lse, _dot(do, v, NT), delta)
            return dq + _dot(ds.astype(k.dtype), k, NN)

        return _skip_disjoint(None if segs is None else segs[2:], i, j, visit, dq)

    dq = lax.fori_loop(0, n_mem + hi_ref[i] - lo, body, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                cols, scale, bq, bk, groups, kv_len):
    segs, (dk_ref, dv_ref) = _split(refs, 2, cols.segments)
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]  # [bk, Hp]
    kseg = None if segs is None else segs[1][...]

    def head(g, carry):
        def body(i, carry):
            def visit(carry):
                dk, dv = carry
                rows = pl.ds(i * bq, bq)
                q, do = q_ref[rows, g, :], do_ref[rows, g, :]  # [bq, Hp]
                lse, delta = lse_ref[g, rows].reshape(bq, 1), delta_ref[g, rows].reshape(bq, 1)
                qseg = None if segs is None else segs[0][rows]
                ok = _ok(cols, offs_ref, i, j, bq, bk, kv_len, qseg, kseg)
                p, ds = probs_and_dscores(_dot(q, k, NT) * scale, ok, lse, _dot(do, v, NT), delta)
                return (dk + _dot(ds.astype(q.dtype), q, TN),
                        dv + _dot(p.astype(do.dtype), do, TN))

            return _skip_disjoint(None if segs is None else segs[2:], i, j, visit, carry)

        return lax.fori_loop(lo_ref[j], hi_ref[j], body, carry)

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


def _segment_inputs(tables: Tables, aux: Aux, tp: int, sp: int, q_spec, k_spec):
    """Inputs and BlockSpecs of the segment refs, in `_split` order (id blocks, then the per-block
    ranges whole)."""
    if tables.q_seg is None:
        return [], []
    qseg = _pad(aux.q_segment_ids, {1: tp})
    kseg = _pad(aux.kv_segment_ids, {1: sp})
    (qmin, qmax), (kmin, kmax) = tables.q_seg, tables.kv_seg
    full = lambda x: pl.BlockSpec((None, x.shape[1]), lambda b, *_: (b, 0))
    ranges = (qmin, qmax, kmin, kmax)
    return [qseg, kseg, *ranges], [q_spec, k_spec] + [full(x) for x in ranges]


def _table_specs(*arrays):
    return [pl.BlockSpec(a.shape, lambda *_, n=a.ndim: (0,) * n) for a in arrays]


def _gpu_forward(static: Static, q, k, v, aux: Aux):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    blocks, interpret = _config(static, t, s, h, backward=False)
    bq, bk = blocks.block_q, blocks.block_k
    nq, nk, hp = -(-t // bq), -(-s // bk), _head_dim(h)
    tp, sp, g = nq * bq, nk * bk, n // kh
    tab = kernel_tables(static.cols, aux.q_offset, aux.k_offset, aux.q_segment_ids,
                        aux.kv_segment_ids, t, bq, s, bk)
    qp, kp, vp = _pad(q, {1: tp, 3: hp}), _pad(k, {1: sp, 3: hp}), _pad(v, {1: sp, 3: hp})
    q_spec = pl.BlockSpec((None, bq, None, hp), lambda b_, n_, i: (b_, i, n_, 0))
    kv_spec = pl.BlockSpec((None, sp, None, hp), lambda b_, n_, i: (b_, 0, lax.div(n_, g), 0))
    seg_in, seg_specs = _segment_inputs(
        tab, aux, tp, sp, pl.BlockSpec((None, bq), lambda b_, n_, i: (b_, i)),
        pl.BlockSpec((None, sp), lambda b_, n_, i: (b_, 0)))
    kernel = functools.partial(
        _forward_kernel, cols=static.cols, scale=static.scale, bq=bq, bk=bk,
        n_mem=-(-min(static.cols.memory_prefix, s) // bk), kv_len=s)
    out, lse = pl.pallas_call(
        kernel, grid=(b, n, nq),
        in_specs=_table_specs(tab.kv_lo, tab.kv_hi, tab.offsets) + [q_spec, kv_spec, kv_spec]
        + seg_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b_, n_, i: (b_, n_, i))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, n, hp), static.out_dtype),
                   jax.ShapeDtypeStruct((b, n, tp), F32)],
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                num_stages=blocks.num_stages),
        interpret=interpret, name="jaxllama_flash_fwd_gpu",
    )(tab.kv_lo, tab.kv_hi, tab.offsets, qp, kp, vp, *seg_in)
    return out[:, :t, :, :h], lse[..., :t]


def _gpu_backward(static: Static, q, k, v, aux: Aux, out, lse, dout, dlse):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    blocks, interpret = _config(static, t, s, h, backward=True)
    bq, bk = blocks.block_q, blocks.block_k
    nq, nk, hp = -(-t // bq), -(-s // bk), _head_dim(h)
    tp, sp, g = nq * bq, nk * bk, n // kh
    tab = kernel_tables(static.cols, aux.q_offset, aux.k_offset, aux.q_segment_ids,
                        aux.kv_segment_ids, t, bq, s, bk)
    qp, dop = _pad(q, {1: tp, 3: hp}), _pad(dout.astype(q.dtype), {1: tp, 3: hp})
    kp, vp = _pad(k, {1: sp, 3: hp}), _pad(v, {1: sp, 3: hp})
    lsep, deltap = _pad(lse, {2: tp}), _pad(row_delta(out, dout, dlse), {2: tp})
    params = pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    common = {"cols": static.cols, "scale": static.scale, "bq": bq, "bk": bk, "kv_len": s}

    # dq: programs (batch, query head, query block), like the forward
    q_spec = pl.BlockSpec((None, bq, None, hp), lambda b_, n_, i: (b_, i, n_, 0))
    kv_full = pl.BlockSpec((None, sp, None, hp), lambda b_, n_, i: (b_, 0, lax.div(n_, g), 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b_, n_, i: (b_, n_, i))
    seg_in, seg_specs = _segment_inputs(
        tab, aux, tp, sp, pl.BlockSpec((None, bq), lambda b_, n_, i: (b_, i)),
        pl.BlockSpec((None, sp), lambda b_, n_, i: (b_, 0)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, n_mem=-(-min(static.cols.memory_prefix, s) // bk),
                          **common),
        grid=(b, n, nq),
        in_specs=_table_specs(tab.kv_lo, tab.kv_hi, tab.offsets)
        + [q_spec, kv_full, kv_full, q_spec, row_spec, row_spec] + seg_specs,
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct((b, tp, n, hp), q.dtype),
        compiler_params=params, interpret=interpret, name="jaxllama_flash_dq_gpu",
    )(tab.kv_lo, tab.kv_hi, tab.offsets, qp, kp, vp, dop, lsep, deltap, *seg_in)

    # dk, dv: programs (batch, kv head, key block) over the G query heads of the group
    group_spec = pl.BlockSpec((None, tp, g, hp), lambda b_, h_, j: (b_, 0, h_, 0))
    kv_spec = pl.BlockSpec((None, bk, None, hp), lambda b_, h_, j: (b_, j, h_, 0))
    rows_spec = pl.BlockSpec((None, g, tp), lambda b_, h_, j: (b_, h_, 0))
    seg_in, seg_specs = _segment_inputs(
        tab, aux, tp, sp, pl.BlockSpec((None, tp), lambda b_, h_, j: (b_, 0)),
        pl.BlockSpec((None, bk), lambda b_, h_, j: (b_, j)))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, groups=g, **common),
        grid=(b, kh, nk),
        in_specs=_table_specs(tab.q_lo, tab.q_hi, tab.offsets)
        + [group_spec, kv_spec, kv_spec, group_spec, rows_spec, rows_spec] + seg_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct((b, sp, kh, hp), k.dtype)] * 2,
        compiler_params=params, interpret=interpret, name="jaxllama_flash_dkv_gpu",
    )(tab.q_lo, tab.q_hi, tab.offsets, qp, kp, vp, dop, lsep, deltap, *seg_in)
    return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :h]


attend_gpu = flash_attention_fn(_gpu_forward, _gpu_backward)
"""attend_gpu(static, q, k, v, aux) -> (out [B T N H], lse [B N T]); static.options holds
("interpret", bool) and optionally ("blocks", (block_q, block_k))."""
