"""Flash-decoding for MLA's absorbed single-query step: op `mla_decode`, split over the key axis.

    out, lse = decode_attend(q_lat, q_rope, latent, rope_k, q_offset, q_segment_ids,
                             kv_segment_ids, scale=..., implementation=...)

q_lat [B N L] (q_nope with W_UK folded in), q_rope [B N R]; the cache latent [B S L] and rope_k
[B S R] are the keys ([latent | rope_k], L + R wide) and the latent alone the values (L wide),
ONE kv head for all N query heads. Key s is visible iff s <= q_offset and its segment id equals
the query's. Returns out [B N L] in q_lat's dtype and lse [B N] float32 (-inf, out 0, for a row
that sees nothing).

Why a kernel of its own: `attend` runs one program per (batch, query head, query block), so for
one query token per row it would read the whole latent cache once per query head and pad the
single query row to a 16-row tile. Here all N heads are the rows of one tile: a program reads each
cached latent once for bn heads (bn = every head up to 64, 16 at L = 512 so the [bn L] float32
accumulator fits in registers), and the key axis is split into P chunks (flash-decoding), one
program each, so a long cache spreads over the machine even at batch 1. Each chunk gives a
normalised partial (out, lse); the P partials are merged by log-sum-exp (the same rule as
`_common.merge_partials`). The query and key are never concatenated: scores are
`q_lat . latent + q_rope . rope_k`, two products per block, and L = 512, R = 64 are already the
power-of-two tiles Triton wants (other widths are zero-padded).

Implementations: `xla` (jnp; the split-K algorithm itself, chunks as a batch axis), `pallas_gpu`
(Triton backend, like pallas_gpu.py) and `pallas_interpret` (the same kernel body in the Pallas
interpreter, CPU tests). No TPU kernel: MLA layers on `pallas_tpu` run the absorbed form through
`attend` (their mixer says so). Forward only: decode has no gradients. Block sizes and splits are
untuned (no GPU in the writing session).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxllama.kernels import _dispatch
from jaxllama.kernels._common import F32, NEG_INF, cdiv, pad_to, round_up

OP = "mla_decode"


def _pow2(x: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (max(x, 1) - 1).bit_length())


def plan(s: int, block_k: int | None = None, splits: int | None = None) -> tuple[int, int, int]:
    """(splits P, chunk C, block bk) for a cache of s slots: C a multiple of bk, P * C >= s.
    P grows with the cache (one chunk per 1024 slots, at most 16, a power of two)."""
    bk = block_k or min(64, _pow2(s))
    p = splits or min(16, _pow2(cdiv(s, 1024), 1))
    c = round_up(cdiv(s, p), bk)
    return p, c, bk


def _visible(q_offset, q_segment_ids, kv_segment_ids):
    """[B S] bool: key s at position s <= q_offset, in the query's segment."""
    s = kv_segment_ids.shape[1]
    return (jnp.arange(s)[None] <= q_offset) & (kv_segment_ids == q_segment_ids[:, None])


def _merge(out_p, lse_p):
    """Partials out [B P N L] (normalised, float32), lse [B P N] -> out [B N L], lse [B N]."""
    m = jnp.max(lse_p, axis=1)
    m_safe = jnp.where(m == NEG_INF, 0.0, m)
    w = jnp.exp(lse_p - m_safe[:, None])  # [B P N]
    tot = jnp.sum(w, axis=1)
    seen = tot > 0
    lse = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, tot, 1.0)), NEG_INF)
    out = jnp.einsum("bpn,bpnl->bnl", w, out_p) / jnp.where(seen, tot, 1.0)[..., None]
    return out, lse


def decode_xla(q_lat, q_rope, latent, rope_k, visible, scale, p, c, bk):
    """The split-K algorithm in jnp: each of the P chunks of C slots gives a partial, merged."""
    del bk
    b, _, l = latent.shape
    sp = p * c
    lat = pad_to(latent, {1: sp}).reshape(b, p, c, l)
    rk = pad_to(rope_k, {1: sp}).reshape(b, p, c, rope_k.shape[2])
    ok = pad_to(visible, {1: sp}).reshape(b, p, 1, c)
    # [B N L] x [B P C L] + [B N R] x [B P C R] -> [B P N C]
    sc = (jnp.einsum("bnl,bpcl->bpnc", q_lat, lat, preferred_element_type=F32)
          + jnp.einsum("bnr,bpcr->bpnc", q_rope, rk, preferred_element_type=F32)) * scale
    sc = jnp.where(ok, sc, NEG_INF)
    m = jnp.max(sc, axis=-1)
    m_safe = jnp.where(m == NEG_INF, 0.0, m)
    pr = jnp.where(ok, jnp.exp(sc - m_safe[..., None]), 0.0)
    den = jnp.sum(pr, axis=-1)
    seen = den > 0
    # [B P N C] x [B P C L] -> [B P N L]
    out = jnp.einsum("bpnc,bpcl->bpnl", pr, lat.astype(F32)) / jnp.where(seen, den, 1.0)[..., None]
    lse = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, den, 1.0)), NEG_INF)
    return _merge(out, lse)


def _kernel(nblk_ref, ql_ref, qr_ref, lat_ref, rk_ref, ok_ref, o_ref, lse_ref, *, scale, c, bk):
    """One program: bn query heads of one row against the keys of one chunk."""
    p = pl.program_id(1)
    ql = ql_ref[...]  # [bn Lp]
    qr = qr_ref[...]  # [bn Rp]
    bn, lp = ql.shape
    nt = (((1,), (1,)), ((), ()))  # a [R, X] x b [C, X] -> [R, C]
    nn_ = (((1,), (0,)), ((), ()))  # a [R, C] x b [C, X] -> [R, X]

    def body(j, carry):
        m, den, acc = carry
        start = p * c + j * bk
        lat = lat_ref[pl.ds(start, bk), :]  # [bk Lp]
        rk = rk_ref[pl.ds(start, bk), :]  # [bk Rp]
        ok = ok_ref[pl.ds(start, bk)][None, :] != 0  # [1 bk]
        sc = (lax.dot_general(ql, lat, nt, preferred_element_type=F32)
              + lax.dot_general(qr, rk, nt, preferred_element_type=F32)) * scale
        sc = jnp.where(ok, sc, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        pr = jnp.where(ok, jnp.exp(sc - m_safe), 0.0)
        acc = alpha * acc + lax.dot_general(pr.astype(lat.dtype), lat, nn_,
                                            preferred_element_type=F32)
        return m_new, alpha * den + jnp.sum(pr, axis=1, keepdims=True), acc

    init = (jnp.full((bn, 1), NEG_INF, F32), jnp.zeros((bn, 1), F32), jnp.zeros((bn, lp), F32))
    m, den, acc = lax.fori_loop(0, nblk_ref[p], body, init)
    seen = den > 0
    o_ref[...] = acc / jnp.where(seen, den, 1.0)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), NEG_INF)[:, 0]


def decode_pallas(q_lat, q_rope, latent, rope_k, visible, scale, p, c, bk, *, interpret):
    """Grid (batch, chunk, head block); partial (out, lse) per chunk, merged in jnp."""
    b, n, l = q_lat.shape
    r = q_rope.shape[2]
    lp, rp = _pow2(l), _pow2(r)
    bn = min(16 if lp >= 512 else 64, _pow2(n))
    np_, sp = round_up(n, bn), p * c
    ql = pad_to(q_lat, {1: np_, 2: lp})
    qr = pad_to(q_rope, {1: np_, 2: rp})
    lat = pad_to(latent, {1: sp, 2: lp})
    rk = pad_to(rope_k, {1: sp, 2: rp})
    ok = pad_to(visible.astype(jnp.int32), {1: sp})
    # key blocks each chunk must visit: up to the last visible slot of any row
    last = jnp.max(jnp.where(visible, jnp.arange(visible.shape[1])[None], -1)) + 1
    nblk = jnp.clip((last - jnp.arange(p) * c + bk - 1) // bk, 0, c // bk).astype(jnp.int32)
    pp = _pow2(p, 1)
    nblk = pad_to(nblk, {0: pp})
    kernel = functools.partial(_kernel, scale=scale, c=c, bk=bk)
    out, lse = pl.pallas_call(
        kernel, grid=(b, p, np_ // bn),
        in_specs=[pl.BlockSpec((pp,), lambda *_: (0,)),
                  pl.BlockSpec((None, bn, lp), lambda b_, p_, h: (b_, h, 0)),
                  pl.BlockSpec((None, bn, rp), lambda b_, p_, h: (b_, h, 0)),
                  pl.BlockSpec((None, sp, lp), lambda b_, p_, h: (b_, 0, 0)),
                  pl.BlockSpec((None, sp, rp), lambda b_, p_, h: (b_, 0, 0)),
                  pl.BlockSpec((None, sp), lambda b_, p_, h: (b_, 0))],
        out_specs=[pl.BlockSpec((None, None, bn, lp), lambda b_, p_, h: (b_, p_, h, 0)),
                   pl.BlockSpec((None, None, bn), lambda b_, p_, h: (b_, p_, h))],
        out_shape=[jax.ShapeDtypeStruct((b, p, np_, lp), F32),
                   jax.ShapeDtypeStruct((b, p, np_), F32)],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="jaxllama_mla_decode_gpu",
    )(nblk, ql, qr, lat, rk, ok)
    out, lse = _merge(out, lse)
    return out[:, :n, :l], lse[:, :n]


def _load_xla():
    return decode_xla, {}


def _load_gpu(interpret: bool):
    def load():
        return decode_pallas, {"interpret": interpret}
    return load


_dispatch.register(OP, auto={"gpu": "pallas_gpu"},
                   implementations={"xla": _load_xla, "pallas_interpret": _load_gpu(True),
                                    "pallas_gpu": _load_gpu(False)})


def has_implementation(name: str) -> bool:
    """Whether `mla_decode` has implementation `name` (`auto` always resolves)."""
    return name == "auto" or name in _dispatch.op_table(OP).implementations


def decode_attend(q_lat, q_rope, latent, rope_k, q_offset, q_segment_ids, kv_segment_ids, *,
                  scale: float, implementation: str = "auto", splits: int | None = None,
                  block_k: int | None = None, return_lse: bool = False):
    """Absorbed MLA decode attention (module docstring): out [B N L] (, lse [B N])."""
    b, n, l = q_lat.shape
    if (q_rope.shape[:2] != (b, n) or latent.shape[0] != b or latent.shape[2] != l
            or rope_k.shape[:2] != latent.shape[:2] or rope_k.shape[2] != q_rope.shape[2]):
        raise ValueError(f"decode_attend: q_lat {q_lat.shape}, q_rope {q_rope.shape}, latent "
                         f"{latent.shape}, rope_k {rope_k.shape} do not fit (need [B N L], "
                         "[B N R], [B S L], [B S R])")
    if kv_segment_ids.shape != latent.shape[:2] or q_segment_ids.shape != (b,):
        raise ValueError(f"decode_attend: segment ids {q_segment_ids.shape}, "
                         f"{kv_segment_ids.shape} must be [B] and [B S]")
    _, (fn, options) = _dispatch.implementation(OP, implementation)
    p, c, bk = plan(latent.shape[1], block_k, splits)
    visible = _visible(jnp.asarray(q_offset, jnp.int32), q_segment_ids, kv_segment_ids)
    out, lse = fn(q_lat, q_rope.astype(q_lat.dtype), latent.astype(q_lat.dtype),
                  rope_k.astype(q_lat.dtype), visible, float(scale), p, c, bk, **options)
    out = out.astype(q_lat.dtype)
    return (out, lse) if return_lse else out


__all__ = ["OP", "decode_attend", "has_implementation", "plan"]
