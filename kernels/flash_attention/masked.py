"""The `xla_masked` implementation: attention as a few large masked matrix products.

Instead of the blockwise online softmax (reference.py: a loop over [block_q, block_k] tiles, each
rescaling a running max, sum and accumulator), the queries are cut into a few chunks of `block_q`
rows and each chunk takes one plain softmax over every key column it may see: one scores product
[B K G Q S], one mask, one max, one exp and sum, one values product, one division of the output.
On a CPU the tile loop's per-step elementwise work and loop overhead dominate a causal prefill
(BENCHMARKS.md), and a few large products can win even though, under a causal mask, they compute
scores that are then masked. `auto` chooses it on CPU only for the lengths where it measured
faster (`heuristics.cpu_masked_attention`); beyond them the blockwise reference runs.

Key range of a chunk: when the mask's offsets are Python ints (`api.attend` passes them as the
`offsets` option), the chunk reads only the key columns [lo, hi) its causal / window rule can
reach, a static slice (causal work about halves); with traced offsets (a cached prefill writing
at a traced length) it reads all S columns, masked. Chunks run as a Python loop (static slices)
or, with traced offsets, as `lax.map` over equal chunks.

Memory: a chunk holds [B N block_q S] float32 scores, so this is for bounded lengths only; the
backward is the blockwise reference's (`reference._reference_backward`, from out and lse), so
training memory stays O(block) whichever forward ran. Same outputs as every implementation:
out [B T N U] in `static.out_dtype`, lse [B N T] float32 (-inf, output 0, for rows that see
nothing); products take the input dtype with float32 accumulation, statistics are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxllama.kernels._common import F32, NEG_INF, cdiv, pad_to, round_up
from jaxllama.kernels.flash_attention import heuristics, reference
from jaxllama.kernels.flash_attention.mask import visible
from jaxllama.kernels.flash_attention.reference import Aux, Static


def _chunk(static: Static, q_i, k_j, v_j, q_pos, k_idx, k_offset, s: int, qseg_i, kseg_j):
    """One masked softmax: q_i [B Q K G H] over k_j [B C K H], v_j [B C K U] ->
    (out [B K G Q U] float32, lse [B K G Q] float32). q_pos [Q 1] positions, k_idx [1 C]."""
    # [B Q K G H] x [B C K H] -> [B K G Q C]
    sc = jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j, preferred_element_type=F32) * static.scale
    ok = visible(static.cols, q_pos, k_idx, k_offset, s)[None]  # [1 Q C]
    if static.cols.segments:
        ok = ok & (qseg_i[:, :, None] == kseg_j[:, None, :])
    sc = jnp.where(ok[:, None, None], sc, NEG_INF)
    m = jnp.max(sc, axis=-1, keepdims=True)
    m = jnp.where(m == NEG_INF, 0.0, m)  # a row that sees nothing: p = 0 everywhere
    p = jnp.exp(sc - m)
    lsum = jnp.sum(p, axis=-1, keepdims=True)
    # [B K G Q C] x [B C K U] -> [B K G Q U]
    out = jnp.einsum("bkgqs,bsku->bkgqu", p.astype(v_j.dtype), v_j, preferred_element_type=F32)
    seen = lsum > 0
    out = out / jnp.where(seen, lsum, 1.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, lsum, 1.0)), NEG_INF)
    return out, lse[..., 0]


def _key_range(static: Static, q_offset: int, k_offset: int, lo_row: int, hi_row: int,
               s: int) -> tuple[int, int]:
    """Static [lo, hi) of the key columns query rows [lo_row, hi_row) can see (rounded out to
    multiples of 128 so nearby chunk shapes share code)."""
    cols = static.cols
    lo, hi = 0, s
    if cols.causal:
        hi = min(s, max(0, q_offset + hi_row - 1 - cols.shift - k_offset + 1))
    if cols.window is not None:
        lo = min(s, max(0, q_offset + lo_row - cols.window + 1 - k_offset))
    lo, hi = lo // 128 * 128, min(s, round_up(hi, 128))
    return lo, max(hi, lo)


def _masked_forward(static: Static, q, k, v, aux: Aux):
    b, t, n, h = q.shape
    s, kh, u = k.shape[1], k.shape[2], v.shape[3]
    g = n // kh
    options = dict(static.options)
    bq = (options.get("blocks") or (heuristics.masked_block_q(t),))[0]
    offsets = options.get("offsets")
    qg = q.reshape(b, t, kh, g, h)
    qseg, kseg = aux.q_segment_ids, aux.kv_segment_ids

    if offsets is not None:  # static offsets: each chunk reads only the keys it can see
        outs, lses = [], []
        for r0 in range(0, t, bq):
            r1 = min(t, r0 + bq)
            lo, hi = _key_range(static, offsets[0], offsets[1], r0, r1, s)
            q_pos = offsets[0] + jnp.arange(r0, r1, dtype=jnp.int32)[:, None]
            if hi == lo:  # nothing visible: out 0, lse -inf
                outs.append(jnp.zeros((b, kh, g, r1 - r0, u), F32))
                lses.append(jnp.full((b, kh, g, r1 - r0), NEG_INF, F32))
                continue
            k_idx = jnp.arange(lo, hi, dtype=jnp.int32)[None, :]
            o, lse = _chunk(static, qg[:, r0:r1], k[:, lo:hi], v[:, lo:hi], q_pos, k_idx,
                            offsets[1], s, None if qseg is None else qseg[:, r0:r1],
                            None if kseg is None else kseg[:, lo:hi])
            outs.append(o)
            lses.append(lse)
        out, lse = jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)
    else:  # traced offsets: equal chunks over all S columns
        nq = cdiv(t, bq)
        qb = jnp.moveaxis(pad_to(qg, {1: nq * bq}).reshape(b, nq, bq, kh, g, h), 1, 0)
        qsb = None
        if qseg is not None:
            qsb = jnp.moveaxis(pad_to(qseg, {1: nq * bq}).reshape(b, nq, bq), 1, 0)
        k_idx = jnp.arange(s, dtype=jnp.int32)[None, :]

        def one(i, q_i, qseg_i):
            q_pos = aux.q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
            return _chunk(static, q_i, k, v, q_pos, k_idx, aux.k_offset, s, qseg_i, kseg)

        if nq == 1:
            out, lse = one(0, qb[0], None if qsb is None else qsb[0])
        else:
            out, lse = jax.lax.map(lambda a: one(*a), (jnp.arange(nq, dtype=jnp.int32), qb, qsb))
            # [nq B K G Q U] -> [B K G nq*Q U]
            out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, nq * bq, u)
            lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, nq * bq)
        out, lse = out[:, :, :, :t], lse[:, :, :, :t]
    # [B K G T U] -> [B T N U];  [B K G T] -> [B N T]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, u)
    return out.astype(static.out_dtype), lse.reshape(b, n, t)


attend_masked = reference.flash_attention_fn(_masked_forward, reference._reference_backward)
"""attend_masked(static, q, k, v, aux) -> (out [B T N U] static.out_dtype, lse [B N T])."""
