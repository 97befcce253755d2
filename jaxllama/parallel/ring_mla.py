"""Ring attention for MLA layers over the `seq` mesh axis (zigzag layout, as `ring_attention`).

What travels: the latent and the rope key, L + R numbers per token, not the expanded keys and
values, N (H + R + U) per token (K kv heads for a GQA-width kv_b). For DeepSeek-V3's shapes that is
576 against 128 x 320 = 40960 numbers, 71x less traffic per ring step. The price is expanding each
arriving latent block with kv_b on every device ([2C L] x [L K H+U] per step, W times per pass),
which is of the order of one kv_b projection of the local tokens per step: small next to the
attention products of the same block, and the reason MLA can afford a ring at all.

The backward is JAX's own: the ring is a `fori_loop` with static bounds (a scan) of `ppermute`s
and `attend(..., return_lse=True)` calls merged by `merge_partials`, all differentiable; each
step's expansion + attention is `jax.checkpoint`ed, so what the backward keeps per step is the
arriving latent block (L + R per token: the whole sequence's latents, the size of an MLA cache)
and the block's out/lse, never its expanded keys and values. Gradients reach kv_b through every
step's expansion and the latent through the reversed `ppermute`s.

The step structure (which local rows see which source chunk) is `ring_attention`'s: step 0 is
causal over the local rows, a source before r is seen by every local query through its first
chunk, a source after r by the second local chunk through both of its chunks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxllama.kernels._common import merge_partials
from jaxllama.kernels.flash_attention.api import Mask, attend
from jaxllama.parallel.context import SEQ_AXIS
from jaxllama.parallel.ring_attention import _rotate
from jaxllama.sharding import logical_to_mesh_spec, mesh_axis_size

F32 = jnp.float32


def _ring(q, lat, rope_k, kv_b, q_seg, kv_seg, *, expand, axis_name, ways, implementation,
          scale):
    """Inside shard_map: local zigzag rows q [B 2C N H+R], lat [B 2C L], rope_k [B 2C R],
    segment ids [B 2C]; kv_b [L K H+U] (this device's kv heads). Returns out [B 2C N U]."""
    r = jax.lax.axis_index(axis_name)
    c = q.shape[1] // 2

    @functools.partial(jax.checkpoint, static_argnums=(5,))
    def block(q_, lat_, rk_, qs, ks, causal):
        k, v = expand(lat_, rk_, kv_b)
        out, lse = attend(q_, k, v, Mask(causal=causal, q_segment_ids=qs, kv_segment_ids=ks),
                          scale=scale, implementation=implementation, return_lse=True)
        return out.astype(F32), lse

    out, lse = block(q, lat, rope_k, q_seg, kv_seg, True)

    def before(lat_, rk_, ks):  # all local queries x the source's first chunk
        return block(q, lat_[:, :c], rk_[:, :c], q_seg, ks[:, :c], False)

    def after(lat_, rk_, ks):  # the second local chunk x all source rows
        o, lse_b = block(q[:, c:], lat_, rk_, q_seg[:, c:], ks, False)
        return (jnp.concatenate([jnp.zeros_like(o), o], axis=1),
                jnp.concatenate([jnp.full_like(lse_b, -jnp.inf), lse_b], axis=2))

    def step(s, carry):
        lat_, rk_, ks, out, lse = carry
        lat_, rk_, ks = (_rotate(a, axis_name, ways) for a in (lat_, rk_, ks))
        out_b, lse_b = jax.lax.cond(s <= r, before, after, lat_, rk_, ks)
        out, lse = merge_partials(out, lse, out_b, lse_b)
        return lat_, rk_, ks, out, lse

    *_, out, _ = jax.lax.fori_loop(1, ways, step, (lat, rope_k, kv_seg, out, lse))
    return out.astype(q.dtype)


def _head_axis(n: int, k: int, mesh):
    """The mesh axis (or None) query and kv heads are split over: only when both divide."""
    heads = logical_to_mesh_spec(("act_heads",), (k,), mesh)[0]
    if heads is not None:
        size = math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads))
        if n % size:
            heads = None
    return heads


def mla_context_attend(q, lat, rope_k, kv_b, segment_ids, *, expand, mode: str,
                       implementation: str, scale: float):
    """Causal MLA attention with T sharded over `seq` (zigzag order): q [B T N H+R], the latent
    lat [B T L] and rotated rope key rope_k [B T R], kv_b [L K H+U]; `expand(lat, rope_k, kv_b)`
    gives keys [B S K H+R] and values [B S K U]. Returns out [B T N U]."""
    if mode != "ring":
        raise ValueError(f"mla layers: context_parallel {mode!r} is not supported (ring only)")
    ways = mesh_axis_size(SEQ_AXIS)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if ways == 1:
        k, v = expand(lat, rope_k, kv_b)
        mask = Mask(causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        return attend(q, k, v, mask, scale=scale, implementation=implementation)
    if q.shape[1] % (2 * ways):
        raise ValueError(f"sequence length {q.shape[1]} is not divisible by 2 x seq axis {ways}")
    mesh = jax.sharding.get_abstract_mesh()
    batch = logical_to_mesh_spec(("batch",), (q.shape[0],), mesh)[0]
    heads = _head_axis(q.shape[2], kv_b.shape[1], mesh)
    row = PartitionSpec(batch, SEQ_AXIS)
    fn = functools.partial(_ring, expand=expand, axis_name=SEQ_AXIS, ways=ways,
                           implementation=implementation, scale=scale)
    return jax.shard_map(
        fn, mesh=mesh,
        in_specs=(PartitionSpec(batch, SEQ_AXIS, heads, None), PartitionSpec(batch, SEQ_AXIS, None),
                  PartitionSpec(batch, SEQ_AXIS, None), PartitionSpec(None, heads, None), row, row),
        out_specs=PartitionSpec(batch, SEQ_AXIS, heads, None),
        check_vma=False)(q, lat, rope_k, kv_b, segment_ids, segment_ids)


__all__ = ["mla_context_attend"]
