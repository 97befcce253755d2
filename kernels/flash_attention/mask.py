"""The one mask description read by the reference and every kernel.

Positions: query row t sits at position `q_offset + t`, key column s at `k_offset + s`. Offsets may be
traced int32 scalars (a decode step writes at a traced cache index).

A key column is visible to a query row iff all of:
  - causal:   k_pos <= q_pos                              (if `causal`)
  - window:   q_pos - k_pos < window                      (if `window` is not None)
  - segments: q_segment_ids[b, t] == kv_segment_ids[b, s] (if both given)
except that the first `memory_prefix` key columns are visible to every query (FoT memory keys),
subject only to segment ids.

Lambda attention (LM-Infinite, METHODS section 5) adds G *sink columns* with their own inputs
(`SinkInputs`): sink key g (position g) is scored with the sink query (the query rotated to the distance
ceiling D) against the un-rotated sink key, and is visible iff q_pos - g >= window (and segments match,
with `sink_segment_ids`); inside the window the same token is seen through its ordinary column.
One softmax runs over the union of ordinary and sink columns.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Mask:
    causal: bool = struct.field(pytree_node=False, default=True)
    window: int | None = struct.field(pytree_node=False, default=None)
    memory_prefix: int = struct.field(pytree_node=False, default=0)
    q_offset: Any = 0
    k_offset: Any = 0
    q_segment_ids: Any = None  # [B T] int32
    kv_segment_ids: Any = None  # [B S] int32


@struct.dataclass
class SinkInputs:
    """Extra sink columns of lambda attention: q [B T N H], k, v [B G K H]."""

    q: Any
    k: Any
    v: Any
    segment_ids: Any = None  # [B G] int32


def dense_mask(mask: Mask, t: int, s: int) -> jax.Array:
    """Boolean visibility [B|1, T, S] of the ordinary key columns (for references and tests)."""
    q_pos = jnp.asarray(mask.q_offset) + jnp.arange(t)[:, None]
    k_pos = jnp.asarray(mask.k_offset) + jnp.arange(s)[None, :]
    ok = jnp.ones((t, s), bool)
    if mask.causal:
        ok &= k_pos <= q_pos
    if mask.window is not None:
        ok &= q_pos - k_pos < mask.window
    if mask.memory_prefix:
        ok |= jnp.arange(s)[None, :] < mask.memory_prefix
    ok = ok[None]
    if mask.q_segment_ids is not None and mask.kv_segment_ids is not None:
        ok = ok & (mask.q_segment_ids[:, :, None] == mask.kv_segment_ids[:, None, :])
    return ok


def sink_mask(mask: Mask, sink: SinkInputs, t: int) -> jax.Array:
    """Boolean visibility [B|1, T, G] of the sink columns."""
    g = sink.k.shape[1]
    q_pos = jnp.asarray(mask.q_offset) + jnp.arange(t)[:, None]
    window = mask.window if mask.window is not None else 0
    ok = (q_pos - jnp.arange(g)[None, :] >= window)[None]
    if mask.q_segment_ids is not None and sink.segment_ids is not None:
        ok = ok & (mask.q_segment_ids[:, :, None] == sink.segment_ids[:, None, :])
    return ok
