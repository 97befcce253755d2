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

from typing import Any, NamedTuple

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


# ----------------------------------------------------------------------------- one column set
# Every implementation computes attention over ONE set of key columns described by `Columns`;
# `api.attend` runs the ordinary set and, for lambda attention, the sink set, then merges the two
# by log-sum-exp. The sink test `q_pos - g >= window` is the causal test shifted by `window`, so one
# rule (below) covers both sets and the kernels need no sink-specific code.


class Columns(NamedTuple):
    """Static description of one key-column set.

    Column s, at position `k_offset + s`, is visible from query position p iff
      (not causal or k_pos <= p - shift) and (window is None or p - k_pos < window),
    or s < memory_prefix; in both cases also s < kv_len and, when `segments`, equal segment ids.
    """

    causal: bool
    shift: int
    window: int | None
    memory_prefix: int
    segments: bool


def ordinary_columns(mask: Mask) -> Columns:
    segments = mask.q_segment_ids is not None and mask.kv_segment_ids is not None
    return Columns(bool(mask.causal), 0, mask.window, int(mask.memory_prefix), segments)


def sink_columns(mask: Mask, sink: SinkInputs) -> Columns:
    """Sink g sits at position g (k_offset 0) and is visible iff q_pos - g >= window."""
    shift = mask.window if mask.window is not None else 0
    segments = mask.q_segment_ids is not None and sink.segment_ids is not None
    return Columns(True, shift, None, 0, segments)


def visible(cols: Columns, q_pos, k_idx, k_offset, kv_len: int):
    """Boolean [R, C] from q_pos [R, 1] and column indices k_idx [1, C] (segments excluded).

    Operands are 2-D and the ops elementwise, so the same function runs in the jnp reference and
    inside the Triton and Mosaic TPU kernel bodies."""
    k_pos = k_offset + k_idx
    ok = jnp.broadcast_to(k_idx < kv_len, (q_pos.shape[0], k_idx.shape[1]))
    if cols.causal:
        ok = ok & (k_pos <= q_pos - cols.shift)
    if cols.window is not None:
        ok = ok & (q_pos - k_pos < cols.window)
    if cols.memory_prefix:
        ok = ok | (k_idx < min(cols.memory_prefix, kv_len))
    return ok


def memory_blocks(cols: Columns, s: int, bk: int) -> int:
    """Number of leading key blocks that hold memory-prefix columns (visible to every query)."""
    return -(-min(cols.memory_prefix, s) // bk)


def kv_block_ranges(cols: Columns, q_offset, k_offset, t: int, bq: int, s: int, bk: int):
    """Per query block i: key blocks [lo_i, hi_i) that can hold a visible non-memory column.

    Returns lo, hi int32 [nq]; the memory blocks [0, memory_blocks) come on top. Offsets may be
    traced. Kernels visit `memory_blocks + hi - lo` blocks and skip the rest."""
    nq, nk = -(-t // bq), -(-s // bk)
    i = jnp.arange(nq, dtype=jnp.int32)
    p_min = q_offset + i * bq
    p_max = q_offset + jnp.minimum((i + 1) * bq, t) - 1
    s_hi = jnp.full_like(i, s)
    s_lo = jnp.zeros_like(i)
    if cols.causal:
        s_hi = jnp.clip(p_max - cols.shift - k_offset + 1, 0, s)
    if cols.window is not None:
        s_lo = jnp.clip(p_min - cols.window + 1 - k_offset, 0, s)
    lo = s_lo // bk
    hi = jnp.where(s_hi > s_lo, (s_hi + bk - 1) // bk, lo)
    lo = jnp.clip(lo, memory_blocks(cols, s, bk), nk)
    return lo.astype(jnp.int32), jnp.clip(hi, lo, nk).astype(jnp.int32)


def q_block_ranges(cols: Columns, q_offset, k_offset, t: int, bq: int, s: int, bk: int):
    """Per key block j: query blocks [lo_j, hi_j) that can see one of its columns (the backward's
    view of the same mask). Memory blocks are seen by every query block. int32 [nk] each."""
    nq, nk = -(-t // bq), -(-s // bk)
    j = jnp.arange(nk, dtype=jnp.int32)
    k_min = k_offset + j * bk
    k_max = k_offset + jnp.minimum((j + 1) * bk, s) - 1
    t_lo = jnp.zeros_like(j)
    t_hi = jnp.full_like(j, t)
    if cols.causal:
        t_lo = jnp.clip(k_min + cols.shift - q_offset, 0, t)
    if cols.window is not None:
        t_hi = jnp.clip(k_max + cols.window - q_offset, 0, t)
    lo = t_lo // bq
    hi = jnp.where(t_hi > t_lo, (t_hi + bq - 1) // bq, lo)
    mem = j < memory_blocks(cols, s, bk)
    lo = jnp.where(mem, 0, jnp.clip(lo, 0, nq))
    hi = jnp.where(mem, nq, jnp.clip(hi, lo, nq))
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def block_at(it, n_first, lo):
    """The block visited at step `it`: the n_first leading blocks, then lo, lo + 1, ..."""
    return jnp.where(it < n_first, it, lo + it - n_first)


def segment_ranges(ids, block: int):
    """Per-block min and max segment id, int32 [B, n] each, of ids [B, L] (edge-padded). Two blocks
    with disjoint [min, max] ranges share no segment, so a kernel may skip the pair."""
    b, n = ids.shape[0], -(-ids.shape[1] // block)
    ids = jnp.pad(ids, ((0, 0), (0, n * block - ids.shape[1])), mode="edge")
    ids = ids.reshape(b, n, block)
    return jnp.min(ids, axis=-1).astype(jnp.int32), jnp.max(ids, axis=-1).astype(jnp.int32)


class Tables(NamedTuple):
    """What a kernel reads to skip blocks: key-block ranges per query block (forward, dq),
    query-block ranges per key block (dk/dv), offsets [2] int32, per-block segment ranges (or
    None)."""

    kv_lo: jax.Array  # [nq]
    kv_hi: jax.Array  # [nq]
    q_lo: jax.Array  # [nk]
    q_hi: jax.Array  # [nk]
    offsets: jax.Array  # [2]: q_offset, k_offset
    q_seg: tuple | None  # (min, max) [B nq]
    kv_seg: tuple | None  # (min, max) [B nk]


def kernel_tables(cols: Columns, q_offset, k_offset, q_seg, kv_seg, t: int, bq: int, s: int,
                  bk: int) -> Tables:
    kv_lo, kv_hi = kv_block_ranges(cols, q_offset, k_offset, t, bq, s, bk)
    q_lo, q_hi = q_block_ranges(cols, q_offset, k_offset, t, bq, s, bk)
    offsets = jnp.stack([jnp.asarray(q_offset, jnp.int32), jnp.asarray(k_offset, jnp.int32)])
    segs = (segment_ranges(q_seg, bq), segment_ranges(kv_seg, bk)) if cols.segments else (None,) * 2
    return Tables(kv_lo, kv_hi, q_lo, q_hi, offsets, *segs)
