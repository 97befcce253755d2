"""Ring attention over the `seq` mesh axis in the zigzag layout (METHODS section 4).

Runs inside `shard_map`: each of the W devices holds 2C query/key/value rows, chunks r and 2W-1-r
of the sequence (see `layout.py`). K/V travel around the ring with `ppermute`; after s steps device
r holds the K/V of device (r - s) mod W. Per step, one static-shaped block goes through the
attention kernel api (`attend(..., return_lse=True)`):

- step 0: causal attention of the local rows over themselves. The local order keeps global
  order (chunk r precedes chunk 2W-1-r), so a causal mask with offsets 0 is exact;
- source before r (s <= r): every local query against the *first* source chunk, fully visible
  (the second source chunk, 2W-1-src, lies after both local chunks);
- source after r: the *second* local chunk against all source rows, fully visible (chunk r
  precedes both source chunks).

Partial results merge by log-sum-exp with the kernels' shared `merge_partials` (the same merge
`attend` uses for its extra key columns). The backward (custom_vjp) runs a second ring that carries the
dK/dV accumulators with K/V; each block's gradients are the kernel's own backward run against the
merged output and log-sum-exp (`attend_backward`: p = exp(s - lse)), so a block's forward runs
once in the forward and never again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllama.kernels._common import merge_partials
from jaxllama.kernels.flash_attention.api import Mask, attend, attend_backward

F32 = jnp.float32


def _rotate(x, axis_name: str, ways: int):
    """Send to the next device of the ring: device r receives from r - 1."""
    return jax.lax.ppermute(x, axis_name, [(i, (i + 1) % ways) for i in range(ways)])


def _mask(causal: bool, q_seg, kv_seg) -> Mask:
    return Mask(causal=causal, q_offset=0, k_offset=0, q_segment_ids=q_seg, kv_segment_ids=kv_seg)


def _block(q, k, v, q_seg, kv_seg, causal, impl, scale):
    out, lse = attend(q, k, v, _mask(causal, q_seg, kv_seg), scale=scale, implementation=impl,
                      return_lse=True)
    return out.astype(F32), lse  # [B T N H], [B N T]


def _block_grads(q, k, v, q_seg, kv_seg, causal, do, out, lse, impl, scale):
    """dq, dk, dv (float32) of this block's share of the merged softmax: the block's scores
    against the merged lse and rowsum(dO * O) (`attend_backward`), so no block forward reruns."""
    return attend_backward(q, k, v, _mask(causal, q_seg, kv_seg), out, lse, do, scale=scale,
                           implementation=impl)


def _forward(q, k, v, q_seg, kv_seg, axis_name, ways, impl, scale):
    r = jax.lax.axis_index(axis_name)
    c = q.shape[1] // 2
    out, lse = _block(q, k, v, q_seg, kv_seg, True, impl, scale)

    def before(k, v, kv_seg):  # all local queries x first source chunk
        return _block(q, k[:, :c], v[:, :c], q_seg, kv_seg[:, :c], False, impl, scale)

    def after(k, v, kv_seg):  # second local chunk x all source rows
        o, lse_b = _block(q[:, c:], k, v, q_seg[:, c:], kv_seg, False, impl, scale)
        return (jnp.concatenate([jnp.zeros_like(o), o], axis=1),
                jnp.concatenate([jnp.full_like(lse_b, -jnp.inf), lse_b], axis=2))

    def step(s, carry):
        k, v, kv_seg, out, lse = carry
        k, v, kv_seg = (_rotate(a, axis_name, ways) for a in (k, v, kv_seg))
        out_b, lse_b = jax.lax.cond(s <= r, before, after, k, v, kv_seg)
        out, lse = merge_partials(out, lse, out_b, lse_b)
        return k, v, kv_seg, out, lse

    *_, out, lse = jax.lax.fori_loop(1, ways, step, (k, v, kv_seg, out, lse))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def ring_attention(q, k, v, q_seg, kv_seg, axis_name: str, ways: int, implementation: str,
                   scale: float | None):
    """Causal attention of local zigzag rows q [B 2C N H] over the whole ring's k, v [B 2C K H];
    q_seg, kv_seg [B 2C] int32 segment ids. Call inside `shard_map` over `axis_name` (size `ways`).
    Returns out [B 2C N H] in q.dtype."""
    out, _ = _forward(q, k, v, q_seg, kv_seg, axis_name, ways, implementation, scale)
    return out.astype(q.dtype)


def _ring_fwd(q, k, v, q_seg, kv_seg, axis_name, ways, implementation, scale):
    out, lse = _forward(q, k, v, q_seg, kv_seg, axis_name, ways, implementation, scale)
    return out.astype(q.dtype), (q, k, v, q_seg, kv_seg, out, lse)


def _ring_bwd(axis_name, ways, impl, scale, res, g):
    q, k, v, q_seg, kv_seg, out, lse = res
    r = jax.lax.axis_index(axis_name)
    c = q.shape[1] // 2
    do = g.astype(F32)
    grads = functools.partial(_block_grads, impl=impl, scale=scale)
    dq, dk, dv = grads(q, k, v, q_seg, kv_seg, True, do, out, lse)

    def before(k, v, kv_seg):
        dq_b, dk_b, dv_b = grads(q, k[:, :c], v[:, :c], q_seg, kv_seg[:, :c], False, do, out, lse)
        return (dq_b, jnp.concatenate([dk_b, jnp.zeros_like(dk_b)], axis=1),
                jnp.concatenate([dv_b, jnp.zeros_like(dv_b)], axis=1))

    def after(k, v, kv_seg):
        dq_b, dk_b, dv_b = grads(q[:, c:], k, v, q_seg[:, c:], kv_seg, False, do[:, c:],
                                 out[:, c:], lse[:, :, c:])
        return jnp.concatenate([jnp.zeros_like(dq_b), dq_b], axis=1), dk_b, dv_b

    def step(s, carry):
        k, v, kv_seg, dq, dk, dv = carry
        # dK/dV accumulators travel with the K/V they belong to
        k, v, kv_seg, dk, dv = (_rotate(a, axis_name, ways) for a in (k, v, kv_seg, dk, dv))
        dq_b, dk_b, dv_b = jax.lax.cond(s <= r, before, after, k, v, kv_seg)
        return k, v, kv_seg, dq + dq_b, dk + dk_b, dv + dv_b

    *_, dq, dk, dv = jax.lax.fori_loop(1, ways, step, (k, v, kv_seg, dq, dk, dv))
    # after W-1 steps device r holds the accumulators of device r + 1: one more hop home
    dk, dv = _rotate(dk, axis_name, ways), _rotate(dv, axis_name, ways)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


ring_attention.defvjp(_ring_fwd, _ring_bwd)
