"""Context parallelism for training attention: the entry point the attention mixer calls.

`context_attend` runs causal attention with the sequence sharded over the `seq` mesh axis, in the
zigzag layout the data pipeline produced (`layout.py`):

- `ring`: `ring_attention` (K/V travel around the ring; memory O(T / W) per device);
- `allgather`: every device gathers the whole K/V (simple, memory O(T)), restores natural order,
  and attends its two query chunks at their global offsets.

Without a mesh, or with a `seq` axis of size 1, it is plain causal attention.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxllama.kernels.flash_attention.api import Mask, attend
from jaxllama.parallel.ring_attention import ring_attention
from jaxllama.sharding import logical_to_mesh_spec, mesh_axis_size

SEQ_AXIS = "seq"


def allgather_attention(q, k, v, q_seg, kv_seg, axis_name: str, ways: int, implementation: str,
                        scale: float | None):
    """Causal attention of local zigzag rows q [B 2C N H] over all-gathered k, v. In shard_map."""
    c = q.shape[1] // 2
    r = jax.lax.axis_index(axis_name)

    def natural(x):  # [B 2C ...] per device -> [B 2WC ...] in sequence order
        g = jax.lax.all_gather(x, axis_name, axis=1)  # [B W 2C ...]
        g = g.reshape(g.shape[:2] + (2, c) + g.shape[3:])  # [B W 2 C ...]
        # device w holds chunks w and 2W-1-w: chunks 0..W-1 are slot 0, W..2W-1 slot 1 reversed
        g = jnp.concatenate([g[:, :, 0], g[:, ::-1, 1]], axis=1)  # [B 2W C ...]
        return g.reshape((g.shape[0], 2 * ways * c) + g.shape[3:])

    k_all, v_all, seg_all = natural(k), natural(v), natural(kv_seg)
    outs = []
    for half, offset in ((0, r * c), (1, (2 * ways - 1 - r) * c)):
        rows = slice(half * c, (half + 1) * c)
        mask = Mask(causal=True, q_offset=offset, k_offset=0, q_segment_ids=q_seg[:, rows],
                    kv_segment_ids=seg_all)
        outs.append(attend(q[:, rows], k_all, v_all, mask, scale=scale,
                           implementation=implementation))
    return jnp.concatenate(outs, axis=1)


_IMPLS = {"ring": ring_attention, "allgather": allgather_attention}


def _specs(q, k, mesh):
    """shard_map specs: batch over (data, fsdp), sequence over seq, heads over tensor when both
    query and kv head counts divide (so each device keeps whole GQA groups)."""
    b, _, n, _ = q.shape
    kh = k.shape[2]
    batch = logical_to_mesh_spec(("batch",), (b,), mesh)[0]
    heads = logical_to_mesh_spec(("act_heads",), (kh,), mesh)[0]
    if heads is not None:
        size = math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads))
        if n % size:
            heads = None
    qkv = PartitionSpec(batch, SEQ_AXIS, heads, None)
    return qkv, PartitionSpec(batch, SEQ_AXIS)


def context_attend(q, k, v, segment_ids=None, *, mode: str = "ring", implementation: str = "auto",
                   scale: float | None = None):
    """Causal self-attention q [B T N H], k, v [B T K H] with T sharded over `seq` (zigzag order).

    `segment_ids` [B T] (None = one segment). Returns out [B T N H]."""
    ways = mesh_axis_size(SEQ_AXIS)
    if mode == "none" or ways == 1:
        mask = Mask(causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        return attend(q, k, v, mask, scale=scale, implementation=implementation)
    if mode not in _IMPLS:
        raise ValueError(f"context_parallel {mode!r} is not one of none, ring, allgather")
    if q.shape[1] % (2 * ways):
        raise ValueError(f"sequence length {q.shape[1]} is not divisible by 2 x seq axis {ways}")
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    qkv, seg = _specs(q, k, mesh)
    fn = functools.partial(_IMPLS[mode], axis_name=SEQ_AXIS, ways=ways,
                           implementation=implementation, scale=scale)
    return jax.shard_map(lambda *a: fn(*a), mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg),
                         out_specs=qkv, check_vma=False)(q, k, v, segment_ids, segment_ids)
