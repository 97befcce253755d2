"""Flash attention for TPUs in Pallas (Mosaic TPU), forward and backward.

Tested on CPU by running these kernels under `pltpu.InterpretParams()` (see
`_dispatch.emulate_tpu`); not run on a TPU yet (none in the writing session).

Shapes: q [B T N H], k [B S K H], v [B S K U] (U may differ from H: MLA). Head dims are not padded:
every block spans the whole head axis, which Mosaic accepts at any size (a block dim must be a
multiple of the 128-lane tile or the full array dim) and lays out in lane tiles itself, so a 576
wide key costs no HBM copy or traffic beyond its own bytes. Sequence axes are padded to whole blocks.

Grid design (the TPU way: the pipeline emitter double-buffers blocks named by index maps):
  - forward and dq: grid (batch, kv head, query block, step). The G query heads of a kv head are
    stacked into one [G * block_q, H] tile, so each K/V block is fetched once per group (GQA without
    repeats). Step `it` visits key block `lo + it` of the query block's range (the causal/window
    band, from `mask.Tables` in SMEM via scalar prefetch; offsets may be traced). Steps past the
    range re-name the last block, so the pipeline issues no new DMA, and the
    body is skipped; so are blocks whose segment range is disjoint from the query block's.
  - dk/dv: grid (batch, kv head, key block, step) over the query blocks that see the key block.
Statistics m, l live in VMEM scratch as [rows, 1]; the log-sum-exp leaves as [.., T, 1].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxllama.kernels._common import F32, NEG_INF, cdiv, pad_to
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

NT = (((1,), (1,)), ((), ()))


def _dot_nt(a, b):
    return lax.dot_general(a, b, NT, preferred_element_type=F32)


def _dot(a, b):
    return lax.dot(a, b, preferred_element_type=F32)


def _config(static: Static, t: int, s: int, g: int, h: int, u: int):
    opts = dict(static.options)
    blocks = heuristics.tpu_blocks(t, s, g, h, u)
    if opts.get("blocks"):
        blocks = blocks._replace(block_q=opts["blocks"][0], block_k=opts["blocks"][1])
    return blocks.block_q, blocks.block_k, opts.get("interpret")


class _Geometry:
    """Static sizes of one call, shared by the wrappers and the kernels."""

    def __init__(self, static: Static, b, t, s, n, kh, h, u):
        self.bq, self.bk, self.interpret = _config(static, t, s, n // kh, h, u)
        self.b, self.t, self.s, self.kh, self.h, self.u = b, t, s, kh, h, u
        self.g = n // kh
        self.nq, self.nk = cdiv(t, self.bq), cdiv(s, self.bk)
        self.tp, self.sp = self.nq * self.bq, self.nk * self.bk
        self.rows = self.g * self.bq


def _to_groups(x, geo: _Geometry):
    """[B T N H] -> [B K G Tp H] (query heads stacked per kv head)."""
    b, h = x.shape[0], x.shape[3]
    x = pad_to(x, {1: geo.tp}).reshape(b, geo.tp, geo.kh, geo.g, h)
    return jnp.transpose(x, (0, 2, 3, 1, 4))


def _from_groups(x, geo: _Geometry):
    b, kh, g, tp, h = x.shape
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b, tp, kh * g, h)[:, :geo.t]


def _rows_to_groups(x, geo: _Geometry):
    """[B N T] -> [B K G Tp 1]."""
    return pad_to(x, {2: geo.tp}).reshape(geo.b, geo.kh, geo.g, geo.tp, 1)


def _stacked_ok(cols, static_kv_len, offs, i, j, geo: _Geometry, qseg, kseg):
    """Visibility [G * bq, bk] of key block j from the stacked query rows of block i."""
    r = lax.broadcasted_iota(jnp.int32, (geo.rows, 1), 0)
    q_pos = offs[0] + i * geo.bq + lax.rem(r, geo.bq)
    k_idx = j * geo.bk + lax.broadcasted_iota(jnp.int32, (1, geo.bk), 1)
    ok = visible(cols, q_pos, k_idx, offs[1], static_kv_len)
    if qseg is not None:
        qseg = jnp.concatenate([qseg] * geo.g, axis=0) if geo.g > 1 else qseg  # [G*bq, 1]
        ok = ok & (qseg == kseg)
    return ok


def _live(seg_tabs, b, i, j, geo: _Geometry):
    """False when query block i and key block j share no segment (scalar, from SMEM tables)."""
    if seg_tabs is None:
        return True
    qmin, qmax, kmin, kmax = seg_tabs
    qi, kj = b * geo.nq + i, b * geo.nk + j
    return (qmin[qi] <= kmax[kj]) & (kmin[kj] <= qmax[qi])


def _prefetch(tab: Tables):
    seg = []
    if tab.q_seg is not None:
        seg = [tab.q_seg[0].reshape(-1), tab.q_seg[1].reshape(-1), tab.kv_seg[0].reshape(-1),
               tab.kv_seg[1].reshape(-1)]
    return seg


def _clamped(it, lo, count, n_blocks):
    """The block lo + it named at step `it`; past the range it repeats the last one (no new
    DMA)."""
    it = jnp.minimum(it, jnp.maximum(count - 1, 0))
    return jnp.clip(lo + it, 0, n_blocks - 1)


# ----------------------------------------------------------------------------- forward and dq


def _unpack(refs, cols, n_inputs: int):
    """(SMEM segment tables or None, input refs, (q ids, kv ids) refs or Nones, the rest)."""
    n_seg = 4 if cols.segments else 0
    seg_tabs, refs = refs[:n_seg] or None, refs[n_seg:]
    inputs, refs = refs[:n_inputs], refs[n_inputs:]
    if cols.segments:
        return seg_tabs, inputs, (refs[0], refs[1]), refs[2:]
    return seg_tabs, inputs, (None, None), refs


class _KvStep:
    """Where a forward/dq grid step stands: query block i, step it, key block j, whether to run."""

    def __init__(self, lo_ref, hi_ref, offs_ref, seg_tabs, seg_refs, cols, geo: _Geometry):
        b, self.i, self.it = pl.program_id(0), pl.program_id(2), pl.program_id(3)
        lo = lo_ref[self.i]
        count = hi_ref[self.i] - lo
        self.j = _clamped(self.it, lo, count, geo.nk)  # the block the pipeline fetched
        self.live = (self.it < count) & _live(seg_tabs, b, self.i, self.j, geo)
        self.last = self.it == pl.num_programs(3) - 1
        self._args = (cols, offs_ref, seg_refs, geo)

    def ok(self):
        cols, offs_ref, (qseg_ref, kseg_ref), geo = self._args
        return _stacked_ok(cols, geo.s, (offs_ref[0], offs_ref[1]), self.i, self.j, geo,
                           None if qseg_ref is None else qseg_ref[...],
                           None if kseg_ref is None else kseg_ref[...])


def _forward_kernel(lo_ref, hi_ref, offs_ref, *refs, cols, scale, geo: _Geometry):
    seg_tabs, (q_ref, k_ref, v_ref), seg_refs, rest = _unpack(refs, cols, 3)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    step = _KvStep(lo_ref, hi_ref, offs_ref, seg_tabs, seg_refs, cols, geo)

    @pl.when(step.it == 0)
    def _():
        m_sc[...] = jnp.full_like(m_sc, NEG_INF)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(step.live)
    def _():
        q = q_ref[...].reshape(geo.rows, geo.h)
        k, v = k_ref[...], v_ref[...]
        m, l, acc = softmax_step(m_sc[...], l_sc[...], acc_sc[...], _dot_nt(q, k) * scale,
                                 step.ok(), lambda p: _dot(p.astype(v.dtype), v))
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(step.last)
    def _():
        out, lse = softmax_finish(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
        lse_ref[...] = lse.reshape(lse_ref.shape)


def _dq_kernel(lo_ref, hi_ref, offs_ref, *refs, cols, scale, geo: _Geometry):
    seg_tabs, ins, seg_refs, (dq_ref, dq_acc) = _unpack(refs, cols, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    step = _KvStep(lo_ref, hi_ref, offs_ref, seg_tabs, seg_refs, cols, geo)

    @pl.when(step.it == 0)
    def _():
        dq_acc[...] = jnp.zeros_like(dq_acc)

    @pl.when(step.live)
    def _():
        q = q_ref[...].reshape(geo.rows, geo.h)
        do = do_ref[...].reshape(geo.rows, geo.u)
        k, v = k_ref[...], v_ref[...]
        lse = lse_ref[...].reshape(geo.rows, 1)
        delta = delta_ref[...].reshape(geo.rows, 1)
        _, ds = probs_and_dscores(_dot_nt(q, k) * scale, step.ok(), lse, _dot_nt(do, v), delta)
        dq_acc[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(step.last)
    def _():
        dq_ref[...] = (dq_acc[...] * scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _kv_step_call(static: Static, geo: _Geometry, tab: Tables, aux: Aux, inputs, backward: bool):
    """pallas_call of `_forward_kernel` or `_dq_kernel`: grid (B, K, nq, nk)."""
    n_pref = 3 + (4 if static.cols.segments else 0)

    def kv_map(b, h, i, it, lo, hi, *_):
        return (b, h, _clamped(it, lo[i], hi[i] - lo[i], geo.nk), 0)

    def kseg_map(b, h, i, it, lo, hi, *_):
        return (b, 0, kv_map(b, h, i, it, lo, hi)[2])

    group = lambda d: pl.BlockSpec((None, None, geo.g, geo.bq, d),
                                   lambda b, h, i, *_: (b, h, 0, i, 0))
    rows = group(1)
    k_spec = pl.BlockSpec((None, None, geo.bk, geo.h), kv_map)
    v_spec = pl.BlockSpec((None, None, geo.bk, geo.u), kv_map)
    in_specs = [group(geo.h), k_spec, v_spec] + ([group(geo.u), rows, rows] if backward else [])
    seg_in = []
    if static.cols.segments:
        seg_in = [pad_to(aux.q_segment_ids, {1: geo.tp})[..., None],
                  pad_to(aux.kv_segment_ids, {1: geo.sp})[:, None, :]]
        in_specs += [pl.BlockSpec((None, geo.bq, 1), lambda b, h, i, *_: (b, i, 0)),
                     pl.BlockSpec((None, 1, geo.bk), kseg_map)]
    dtype = inputs[0].dtype
    if backward:
        out_specs = group(geo.h)
        out_shape = jax.ShapeDtypeStruct((geo.b, geo.kh, geo.g, geo.tp, geo.h), dtype)
        scratch = [pltpu.VMEM((geo.rows, geo.h), F32)]
        name = "jaxllama_flash_dq_tpu"
    else:
        out_specs = [group(geo.u), rows]
        out_shape = [jax.ShapeDtypeStruct((geo.b, geo.kh, geo.g, geo.tp, geo.u), static.out_dtype),
                     jax.ShapeDtypeStruct((geo.b, geo.kh, geo.g, geo.tp, 1), F32)]
        scratch = [pltpu.VMEM((geo.rows, 1), F32), pltpu.VMEM((geo.rows, 1), F32),
                   pltpu.VMEM((geo.rows, geo.u), F32)]
        name = "jaxllama_flash_fwd_tpu"
    kernel = functools.partial(_dq_kernel if backward else _forward_kernel, cols=static.cols,
                               scale=static.scale, geo=geo)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=n_pref, grid=(geo.b, geo.kh, geo.nq, geo.nk), in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=geo.interpret or False, name=name,
    )(tab.kv_lo, tab.kv_hi, tab.offsets, *_prefetch(tab), *inputs, *seg_in)


# ----------------------------------------------------------------------------- dk, dv


def _dkv_kernel(lo_ref, hi_ref, offs_ref, *refs, cols, scale, geo: _Geometry):
    seg_tabs, ins, (qseg_ref, kseg_ref), rest = _unpack(refs, cols, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    dk_ref, dv_ref, dk_acc, dv_acc = rest
    b, j, it = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi = lo_ref[j], hi_ref[j]
    i = _clamped(it, lo, hi - lo, geo.nq)

    @pl.when(it == 0)
    def _():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when((lo + it < hi) & _live(seg_tabs, b, i, j, geo))
    def _():
        k, v = k_ref[...], v_ref[...]
        q = q_ref[...].reshape(geo.rows, geo.h)
        do = do_ref[...].reshape(geo.rows, geo.u)
        lse = lse_ref[...].reshape(geo.rows, 1)
        delta = delta_ref[...].reshape(geo.rows, 1)
        ok = _stacked_ok(cols, geo.s, (offs_ref[0], offs_ref[1]), i, j, geo,
                         None if qseg_ref is None else qseg_ref[...],
                         None if kseg_ref is None else kseg_ref[...])
        p, ds = probs_and_dscores(_dot_nt(q, k) * scale, ok, lse, _dot_nt(do, v), delta)
        # the stacked rows hold all G heads of the group: the products sum over them
        dv_acc[...] += _dot(p.astype(do.dtype).T, do)
        dk_acc[...] += _dot(ds.astype(q.dtype).T, q)

    @pl.when(it == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dkv_call(static: Static, geo: _Geometry, tab: Tables, aux: Aux, inputs):
    """pallas_call of `_dkv_kernel`: grid (B, K, nk, nq)."""
    def q_map(b, h, j, it, lo, hi, *_):
        return (b, h, 0, _clamped(it, lo[j], hi[j] - lo[j], geo.nq), 0)

    group = lambda d: pl.BlockSpec((None, None, geo.g, geo.bq, d), q_map)
    kv = lambda d: pl.BlockSpec((None, None, geo.bk, d), lambda b, h, j, *_: (b, h, j, 0))
    in_specs = [group(geo.h), kv(geo.h), kv(geo.u), group(geo.u), group(1), group(1)]
    seg_in = []
    if static.cols.segments:
        seg_in = [pad_to(aux.q_segment_ids, {1: geo.tp})[..., None],
                  pad_to(aux.kv_segment_ids, {1: geo.sp})[:, None, :]]
        qseg_map = lambda b, h, j, it, lo, hi, *_: (b, q_map(b, h, j, it, lo, hi)[3], 0)
        in_specs += [pl.BlockSpec((None, geo.bq, 1), qseg_map),
                     pl.BlockSpec((None, 1, geo.bk), lambda b, h, j, *_: (b, 0, j))]
    kernel = functools.partial(_dkv_kernel, cols=static.cols, scale=static.scale, geo=geo)
    shapes = [jax.ShapeDtypeStruct((geo.b, geo.kh, geo.sp, geo.h), inputs[1].dtype),
              jax.ShapeDtypeStruct((geo.b, geo.kh, geo.sp, geo.u), inputs[2].dtype)]
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3 + (4 if static.cols.segments else 0),
            grid=(geo.b, geo.kh, geo.nk, geo.nq), in_specs=in_specs,
            out_specs=[kv(geo.h), kv(geo.u)],
            scratch_shapes=[pltpu.VMEM((geo.bk, geo.h), F32), pltpu.VMEM((geo.bk, geo.u), F32)]),
        out_shape=shapes,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=geo.interpret or False, name="jaxllama_flash_dkv_tpu",
    )(tab.q_lo, tab.q_hi, tab.offsets, *_prefetch(tab), *inputs, *seg_in)


# ----------------------------------------------------------------------------- wrappers


def _setup(static: Static, q, k, v, aux: Aux):
    b, t, n, h = q.shape
    geo = _Geometry(static, b, t, k.shape[1], n, k.shape[2], h, v.shape[3])
    tab = kernel_tables(static.cols, aux.q_offset, aux.k_offset, aux.q_segment_ids,
                        aux.kv_segment_ids, t, geo.bq, geo.s, geo.bk)
    return geo, tab


def _kv_heads(x, geo: _Geometry):
    """[B S K H] -> [B K Sp H] (values: U for H)."""
    return jnp.transpose(pad_to(x, {1: geo.sp}), (0, 2, 1, 3))


def _tpu_forward(static: Static, q, k, v, aux: Aux):
    geo, tab = _setup(static, q, k, v, aux)
    out, lse = _kv_step_call(static, geo, tab, aux,
                             [_to_groups(q, geo), _kv_heads(k, geo), _kv_heads(v, geo)], False)
    lse = lse[..., 0].reshape(geo.b, geo.kh * geo.g, geo.tp)[..., :geo.t]
    return _from_groups(out, geo), lse


def _tpu_backward(static: Static, q, k, v, aux: Aux, out, lse, dout, dlse):
    geo, tab = _setup(static, q, k, v, aux)
    inputs = [_to_groups(q, geo), _kv_heads(k, geo), _kv_heads(v, geo),
              _to_groups(dout.astype(q.dtype), geo), _rows_to_groups(lse, geo),
              _rows_to_groups(row_delta(out, dout, dlse), geo)]
    dq = _kv_step_call(static, geo, tab, aux, inputs, True)
    dk, dv = _dkv_call(static, geo, tab, aux, inputs)
    unkv = lambda x: jnp.transpose(x, (0, 2, 1, 3))[:, :geo.s]
    return _from_groups(dq, geo), unkv(dk), unkv(dv)


attend_tpu = flash_attention_fn(_tpu_forward, _tpu_backward)
"""attend_tpu(static, q, k, v, aux) -> (out [B T N U], lse [B N T]); static.options holds
("interpret", pltpu.InterpretParams() or None) and optionally ("blocks", (block_q, block_k))."""
