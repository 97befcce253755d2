"""Pure-jnp attention: the specification and the `xla` implementation.

q [B T N H], k, v [B S K H] with N = K * G (GQA without repeating K/V). Statistics in float32.
Returns out [B T N H] (q.dtype) and lse [B N T] (float32; -inf for rows that see nothing, whose output
is 0).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxllama.kernels.flash_attention.mask import Mask, SinkInputs, dense_mask, sink_mask

NEG_INF = float("-inf")


def _scores(q, k, scale):
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    # [B T K G H] x [B S K H] -> [B K G T S]
    return jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale


def attend_reference(q, k, v, mask: Mask, sink: SinkInputs | None = None, scale=None):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = h ** -0.5 if scale is None else scale
    scores = _scores(q, k, scale)
    ok = dense_mask(mask, t, s)[:, None, None]  # [B 1 1 T S]
    scores = jnp.where(ok, scores, NEG_INF)
    vals = v
    if sink is not None:
        sscores = _scores(sink.q, sink.k, scale)
        sok = sink_mask(mask, sink, t)[:, None, None]
        scores = jnp.concatenate([jnp.where(sok, sscores, NEG_INF), scores], axis=-1)
        vals = jnp.concatenate([sink.v, v], axis=1)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m_safe)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    lse = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + m_safe[..., 0], NEG_INF)  # [B K G T]
    p = p / jnp.where(denom > 0, denom, 1.0)
    # [B K G T S] x [B S K H] -> [B T K G H]
    out = jnp.einsum("bkgts,bskh->btkgh", p.astype(vals.dtype) if vals.dtype != jnp.float32 else p,
                     vals, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype), lse.reshape(b, n, t)
