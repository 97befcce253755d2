"""Helpers every kernel folder shares: integer block arithmetic, zero padding, and the log-sum-exp
merge of partial attention results. One copy here instead of one per file.

`merge_partials` is how attention over a union of key-column sets is computed without ever
concatenating the sets: each set gives its normalised output and log-sum-exp, and the union is
their lse-weighted sum. The blockwise reference (ordinary + extra columns in `api.attend`) and ring
attention (one partial per ring step, jaxllama/parallel/ring_attention.py) both merge this way.
"""

from __future__ import annotations

import jax.numpy as jnp

NEG_INF = float("-inf")
F32 = jnp.float32


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers (the number of size-b blocks that cover a)."""
    return -(-a // b)


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= x."""
    return cdiv(x, multiple) * multiple


def pad_to(x, sizes: dict[int, int]):
    """x zero-padded at the end of each axis a in `sizes` to length sizes[a] (None passes through;
    no copy when nothing grows)."""
    if x is None:
        return None
    widths = [(0, sizes.get(a, x.shape[a]) - x.shape[a]) for a in range(x.ndim)]
    if any(w < 0 for _, w in widths):
        raise ValueError(f"pad_to: shape {x.shape} is larger than the target sizes {sizes}")
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint column sets from each set's own normalised result:
    out_* [B T N U], lse_* [B N T] float32 (-inf where a set has no visible column).

    Returns (out [B T N U] float32, lse [B N T] float32): weights exp(lse_* - lse) of the union.
    Differentiable, and safe where either side or both saw nothing (out 0, lse -inf)."""
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(m == NEG_INF, 0.0, m)
    wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    tot = wa + wb
    seen = tot > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, tot, 1.0)), NEG_INF)
    to_rows = lambda w: jnp.transpose(w / jnp.where(seen, tot, 1.0), (0, 2, 1))[..., None]
    out = to_rows(wa) * out_a.astype(F32) + to_rows(wb) * out_b.astype(F32)
    return out, lse
