"""Pure-jnp attention: the specification, and the `xla` implementation.

q [B T N H], k [B S K H], v [B S K U] with N = K * G: query head n reads key/value head n // G, and
K/V are never repeated in memory. The value head dim U may differ from the key head dim H (MLA:
keys 192 wide with values 128 in the expanded form, 576 with 512 in the absorbed form). Statistics
are float32. Every implementation returns out [B T N U] and the log-sum-exp lse [B N T] (float32);
a row that sees no column has lse -inf and output 0.

Two functions:
  - `attend_naive`: one dense [T, S + M] softmax over the ordinary and the extra columns
    (concatenated: it is the specification, not the fast path), differentiated by JAX. Small
    shapes only; it is what every implementation is tested against.
  - `attend_blockwise`: the online-softmax (flash) formulation over key blocks, forward and
    backward (custom_vjp), holding O(block_q x block_k) scores per step. It visits only the key
    blocks a query block can see (causal, window; offsets may be traced), for one column set
    (`mask.Columns`). `api.attend` merges the ordinary and extra sets with
    `_common.merge_partials`.

The per-block math (`softmax_step`, `probs_and_dscores`) and the custom_vjp plumbing
(`flash_attention_fn`) are shared with the Pallas kernels, so all implementations run one algorithm.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxllama.kernels._common import F32, NEG_INF, cdiv, pad_to
from jaxllama.kernels.flash_attention import heuristics
from jaxllama.kernels.flash_attention.mask import (
    Columns,
    ExtraColumns,
    Mask,
    dense_mask,
    extra_mask,
    kv_block_ranges,
    q_block_ranges,
    visible,
)

# ----------------------------------------------------------------------------- naive (tests only)


def _dense_scores(q, k, scale):
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    # [B T K G H] x [B S K H] -> [B K G T S]
    return jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=F32) * scale


def attend_naive(q, k, v, mask: Mask, extra: ExtraColumns | None = None, scale=None):
    """Dense softmax over ordinary and extra columns: (out [B T N U], lse [B N T])."""
    b, t, n, h = q.shape
    s, u = k.shape[1], v.shape[3]
    scale = h ** -0.5 if scale is None else scale
    scores = jnp.where(dense_mask(mask, t, s)[:, None, None], _dense_scores(q, k, scale), NEG_INF)
    vals = v
    if extra is not None:
        escores = _dense_scores(q if extra.q is None else extra.q, extra.k, scale)
        eok = extra_mask(mask, extra, t)[:, None, None]
        scores = jnp.concatenate([jnp.where(eok, escores, NEG_INF), scores], axis=-1)
        vals = jnp.concatenate([extra.v, v], axis=1)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m_safe)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    lse = jnp.where(denom[..., 0] > 0, jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0))
                    + m_safe[..., 0], NEG_INF)  # [B K G T]
    p = p / jnp.where(denom > 0, denom, 1.0)
    # [B K G T S] x [B S K U] -> [B T K G U]
    out = jnp.einsum("bkgts,bsku->btkgu", p, vals.astype(F32), preferred_element_type=F32)
    return out.reshape(b, t, n, u).astype(q.dtype), lse.reshape(b, n, t)


# ----------------------------------------------------------------------------- shared block math


def softmax_step(m, l, acc, s, ok, pv):
    """One online-softmax update with a block of scores s [..., R, C] (float32, already scaled) and
    visibility ok. m, l [..., R, 1] float32 running max and sum; acc [..., R, U] float32 (or a
    tuple of such pieces: the GPU kernel splits wide heads); pv(p) maps probabilities [..., R, C]
    to their values, shaped like acc. Masked entries never enter."""
    s = jnp.where(ok, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # a row with nothing visible yet stays at 0
    alpha = jnp.exp(m - m_safe)
    p = jnp.where(ok, jnp.exp(s - m_safe), 0.0)
    acc = jax.tree.map(lambda a, x: alpha * a + x, acc, pv(p))
    return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), acc


def softmax_finish(m, l, acc):
    """(out [..., R, U] float32 (shaped like acc), lse [..., R, 1]) with out 0 and lse -inf where
    nothing was seen."""
    seen = l > 0
    out = jax.tree.map(lambda a: a / jnp.where(seen, l, 1.0), acc)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG_INF)
    return out, lse


def probs_and_dscores(s, ok, lse, dp, delta):
    """Backward of one block: p = softmax probabilities recomputed from lse [..., R, 1], and
    ds = p * (dp - delta), the cotangent of the (scaled) scores. delta = rowsum(dO * O) - dlse."""
    p = jnp.where(ok, jnp.exp(s - jnp.where(lse == NEG_INF, 0.0, lse)), 0.0)
    return p, p * (dp - delta)


# ----------------------------------------------------------------------------- custom_vjp plumbing


class Aux(NamedTuple):
    """Non-differentiable inputs of one column set: traced offsets and optional segment ids."""

    q_offset: jax.Array  # int32 []
    k_offset: jax.Array  # int32 []
    q_segment_ids: jax.Array | None  # [B T] int32
    kv_segment_ids: jax.Array | None  # [B S] int32


class Static(NamedTuple):
    """Hashable call description: the column set, the score scale, the output dtype and the
    implementation's own options (block sizes, interpret mode)."""

    cols: Columns
    scale: float
    out_dtype: str
    options: tuple = ()


def flash_attention_fn(forward, backward):
    """Wraps forward(static, q, k, v, aux) -> (out, lse) and
    backward(static, q, k, v, aux, out, lse, dout, dlse) -> (dq, dk, dv) into a custom_vjp function
    f(static, q, k, v, aux). The lse output is differentiable too (ring attention and the sink merge
    need it): its cotangent enters the backward as delta = rowsum(dO * O) - dlse. The backward
    stays reachable as `f.backward` (ring attention runs it with the merged statistics)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attention(static, q, k, v, aux):
        return forward(static, q, k, v, aux)

    def fwd(static, q, k, v, aux):
        out, lse = forward(static, q, k, v, aux)
        return (out, lse), (q, k, v, aux, out, lse)

    def bwd(static, res, cts):
        q, k, v, aux, out, lse = res
        dq, dk, dv = backward(static, q, k, v, aux, out, lse, *cts)
        zero_aux = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), aux)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_aux

    attention.defvjp(fwd, bwd)
    attention.backward = backward  # `api.attend_backward`: gradients from given statistics
    return attention


def row_delta(out, dout, dlse):
    """delta [B N T] float32 = rowsum(dO * O) - dlse, from out, dout [B T N U]."""
    d = jnp.einsum("btnu,btnu->bnt", dout.astype(F32), out.astype(F32))
    return d - dlse.astype(F32)


# ----------------------------------------------------------------------------- blockwise reference


def _pad(x, axis: int, size: int):
    return pad_to(x, {axis: size})


def _slice(x, start, size: int, axis: int = 1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _block_ok(static: Static, aux: Aux, i, j, bq: int, bk: int, s: int, qseg_i, kseg_j):
    """Visibility [B|1, 1, 1, bq, bk] of key block j from query block i (layout [B K G Q S])."""
    q_pos = aux.q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
    k_idx = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
    ok = visible(static.cols, q_pos, k_idx, aux.k_offset, s)[None]
    if static.cols.segments:
        ok = ok & (qseg_i[:, :, None] == kseg_j[:, None, :])
    return ok[:, None, None]


def _blocks(static: Static, t: int, s: int):
    bq, bk = (dict(static.options).get("blocks")
              or heuristics.reference_blocks(t, s, static.cols.window))
    return bq, bk, cdiv(t, bq), cdiv(s, bk)


def _reference_forward(static: Static, q, k, v, aux: Aux):
    b, t, n, h = q.shape
    s, kh, u = k.shape[1], k.shape[2], v.shape[3]
    g = n // kh
    bq, bk, nq, nk = _blocks(static, t, s)
    lo, hi = kv_block_ranges(static.cols, aux.q_offset, aux.k_offset, t, bq, s, bk)
    qb = jnp.moveaxis(_pad(q, 1, nq * bq).reshape(b, nq, bq, kh, g, h), 1, 0)
    kp, vp = _pad(k, 1, nk * bk), _pad(v, 1, nk * bk)
    qseg = kseg = None
    if static.cols.segments:
        qseg = jnp.moveaxis(_pad(aux.q_segment_ids, 1, nq * bq).reshape(b, nq, bq), 1, 0)
        kseg = _pad(aux.kv_segment_ids, 1, nk * bk)

    def one_query_block(i, q_i, qseg_i):
        def step(it, carry):
            j = lo[i] + it
            k_j, v_j = _slice(kp, j * bk, bk), _slice(vp, j * bk, bk)
            kseg_j = None if kseg is None else _slice(kseg, j * bk, bk)
            # [B Q K G H] x [B S K H] -> [B K G Q S]
            sc = jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j, preferred_element_type=F32)
            ok = _block_ok(static, aux, i, j, bq, bk, s, qseg_i, kseg_j)
            # [B K G Q S] x [B S K U] -> [B K G Q U]
            pv = lambda p: jnp.einsum("bkgqs,bsku->bkgqu", p.astype(v_j.dtype), v_j,
                                      preferred_element_type=F32)
            return softmax_step(*carry, sc * static.scale, ok, pv)

        init = (jnp.full((b, kh, g, bq, 1), NEG_INF, F32), jnp.zeros((b, kh, g, bq, 1), F32),
                jnp.zeros((b, kh, g, bq, u), F32))
        out, lse = softmax_finish(*jax.lax.fori_loop(0, hi[i] - lo[i], step, init))
        return out, lse[..., 0]  # [B K G Q U], [B K G Q]

    if nq == 1:
        out, lse = one_query_block(0, qb[0], None if qseg is None else qseg[0])
        out, lse = out[None], lse[None]
    else:
        out, lse = jax.lax.map(lambda a: one_query_block(*a),
                               (jnp.arange(nq, dtype=jnp.int32), qb, qseg))
    # [nq B K G Q U] -> [B T N U];  [nq B K G Q] -> [B N T]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, nq * bq, n, u)[:, :t]
    lse = jnp.transpose(lse, (1, 2, 3, 0, 4)).reshape(b, n, nq * bq)[..., :t]
    return out.astype(static.out_dtype), lse


def _reference_backward(static: Static, q, k, v, aux: Aux, out, lse, dout, dlse):
    """One pass over key blocks (scan); per key block a loop over the query blocks that see it.
    dk, dv of the block accumulate in the loop carry; dq accumulates in place across the scan."""
    b, t, n, h = q.shape
    s, kh, u = k.shape[1], k.shape[2], v.shape[3]
    g = n // kh
    bq, bk, nq, nk = _blocks(static, t, s)
    tp = nq * bq
    q_lo, q_hi = q_block_ranges(static.cols, aux.q_offset, aux.k_offset, t, bq, s, bk)
    qp = _pad(q, 1, tp).reshape(b, tp, kh, g, h)
    dop = _pad(dout, 1, tp).reshape(b, tp, kh, g, u)
    as_rows = lambda x: _pad(x, 2, tp).reshape(b, kh, g, tp)[..., None]
    lse_p, delta_p = as_rows(lse), as_rows(row_delta(out, dout, dlse))
    kb = jnp.moveaxis(_pad(k, 1, nk * bk).reshape(b, nk, bk, kh, h), 1, 0)
    vb = jnp.moveaxis(_pad(v, 1, nk * bk).reshape(b, nk, bk, kh, u), 1, 0)
    qseg = _pad(aux.q_segment_ids, 1, tp) if static.cols.segments else None
    kseg = None
    if static.cols.segments:
        kseg = jnp.moveaxis(_pad(aux.kv_segment_ids, 1, nk * bk).reshape(b, nk, bk), 1, 0)

    def one_key_block(dq, xs):
        j, k_j, v_j, kseg_j = xs

        def step(i, carry):
            dq, dk, dv = carry
            q_i, do_i = _slice(qp, i * bq, bq), _slice(dop, i * bq, bq)
            lse_i, delta_i = _slice(lse_p, i * bq, bq, 3), _slice(delta_p, i * bq, bq, 3)
            qseg_i = None if qseg is None else _slice(qseg, i * bq, bq)
            sc = jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j, preferred_element_type=F32)
            # [B Q K G U] x [B S K U] -> [B K G Q S]
            dp = jnp.einsum("bqkgu,bsku->bkgqs", do_i, v_j, preferred_element_type=F32)
            ok = _block_ok(static, aux, i, j, bq, bk, s, qseg_i, kseg_j)
            p, ds = probs_and_dscores(sc * static.scale, ok, lse_i, dp, delta_i)
            p, ds = p.astype(q.dtype), (ds * static.scale).astype(q.dtype)
            # [B K G Q S] x [B Q K G U] -> [B S K U]
            dv = dv + jnp.einsum("bkgqs,bqkgu->bsku", p, do_i, preferred_element_type=F32)
            # [B K G Q S] x [B Q K G H] -> [B S K H]
            dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, q_i, preferred_element_type=F32)
            # [B K G Q S] x [B S K H] -> [B Q K G H]
            dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_j, preferred_element_type=F32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, i * bq, bq) + dq_i, i * bq, 1)
            return dq, dk, dv

        init = (dq, jnp.zeros((b, bk, kh, h), F32), jnp.zeros((b, bk, kh, u), F32))
        dq, dk, dv = jax.lax.fori_loop(q_lo[j], q_hi[j], step, init)
        return dq, (dk, dv)

    dq0 = jnp.zeros((b, tp, kh, g, h), F32)
    xs = (jnp.arange(nk, dtype=jnp.int32), kb, vb, kseg)
    dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, xs)
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, nk * bk, kh, x.shape[-1])[:, :s]
    return dq.reshape(b, tp, n, h)[:, :t], unblock(dk), unblock(dv)


attend_blockwise = flash_attention_fn(_reference_forward, _reference_backward)
"""attend_blockwise(static, q, k, v, aux) -> (out [B T N U] static.out_dtype, lse [B N T])."""
