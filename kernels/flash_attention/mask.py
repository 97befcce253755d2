"""The one mask description read by the reference and every kernel.

Positions: query row t sits at position `q_offset + t`, key column s at `k_offset + s`. Offsets may be
traced int32 scalars (a decode step writes at a traced cache index).

A key column is visible to a query row iff all of:
  - causal:   k_pos <= q_pos                              (if `causal`)
  - window:   q_pos - k_pos < window                      (if `window` is not None)
  - segments: q_segment_ids[b, t] == kv_segment_ids[b, s] (if both given)

Extra key columns (`ExtraColumns`): one more set of M columns with their own keys k [B M K H],
values v [B M K U], optionally their own queries (q [B T N H]: each query row scores them with its
own query vector) and segment ids [B M], and one visibility rule:
  - `beyond_window` (lambda attention's far sinks, LM-Infinite, METHODS section 5): extra column g
    sits at position g and is visible iff q_pos - g >= window (window None counts as 0); inside the
    window the same token is seen through its ordinary column;
  - `always` (FoT memory, METHODS section 7: "every written memory slot"): visible to every query,
    subject only to segment ids; unwritten slots carry a segment id no query has (0 or -1).
Extra segment ids need `q_segment_ids` (a query's segment decides which extra columns it sees).
One softmax runs over the union of ordinary and extra columns: `api.attend` computes each set on
its own and merges them by log-sum-exp (`_common.merge_partials`), so extra keys are never
concatenated with the ordinary keys.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jaxllama.kernels._common import cdiv

BEYOND_WINDOW = "beyond_window"
ALWAYS = "always"
VISIBILITIES = (BEYOND_WINDOW, ALWAYS)


@struct.dataclass
class Mask:
    causal: bool = struct.field(pytree_node=False, default=True)
    window: int | None = struct.field(pytree_node=False, default=None)
    q_offset: Any = 0
    k_offset: Any = 0
    q_segment_ids: Any = None  # [B T] int32
    kv_segment_ids: Any = None  # [B S] int32


@struct.dataclass
class ExtraColumns:
    """M extra key columns: k [B M K H], v [B M K U], their `visibility` (one of VISIBILITIES), own
    queries q [B T N H] (None: the ordinary q) and segment ids [B M] int32 (None: no segment test).
    K, H and U are those of the ordinary keys and values; the caller casts k, v to the query dtype
    (as the dense cache is cast on read), so a FoT memory kept in `mem_dtype` is cast by its layer.
    """

    k: Any
    v: Any
    visibility: str = struct.field(pytree_node=False)
    q: Any = None
    segment_ids: Any = None


def dense_mask(mask: Mask, t: int, s: int) -> jax.Array:
    """Boolean visibility [B|1, T, S] of the ordinary key columns (for references and tests)."""
    q_pos = jnp.asarray(mask.q_offset) + jnp.arange(t)[:, None]
    k_pos = jnp.asarray(mask.k_offset) + jnp.arange(s)[None, :]
    ok = jnp.ones((t, s), bool)
    if mask.causal:
        ok &= k_pos <= q_pos
    if mask.window is not None:
        ok &= q_pos - k_pos < mask.window
    ok = ok[None]
    if mask.q_segment_ids is not None and mask.kv_segment_ids is not None:
        ok = ok & (mask.q_segment_ids[:, :, None] == mask.kv_segment_ids[:, None, :])
    return ok


def extra_mask(mask: Mask, extra: ExtraColumns, t: int) -> jax.Array:
    """Boolean visibility [B|1, T, M] of the extra columns, from the definition above."""
    m = extra.k.shape[1]
    if extra.visibility == ALWAYS:
        ok = jnp.ones((1, t, m), bool)
    else:
        q_pos = jnp.asarray(mask.q_offset) + jnp.arange(t)[:, None]
        window = mask.window if mask.window is not None else 0
        ok = (q_pos - jnp.arange(m)[None, :] >= window)[None]
    if mask.q_segment_ids is not None and extra.segment_ids is not None:
        ok = ok & (mask.q_segment_ids[:, :, None] == extra.segment_ids[:, None, :])
    return ok


# ----------------------------------------------------------------------------- one column set
# Every implementation computes attention over ONE set of key columns described by `Columns`;
# `api.attend` runs the ordinary set and, when given, the extra set, then merges the two by
# log-sum-exp. The `beyond_window` test `q_pos - g >= window` is the causal test shifted by
# `window`, and `always` is a non-causal set, so one rule (below) covers every set and the kernels
# need no code specific to sinks or memory.


class Columns(NamedTuple):
    """Static description of one key-column set.

    Column s, at position `k_offset + s`, is visible from query position p iff s < kv_len and
      (not causal or k_pos <= p - shift) and (window is None or p - k_pos < window)
    and, when `segments`, the segment ids are equal.
    """

    causal: bool
    shift: int
    window: int | None
    segments: bool


def ordinary_columns(mask: Mask) -> Columns:
    segments = mask.q_segment_ids is not None and mask.kv_segment_ids is not None
    return Columns(bool(mask.causal), 0, mask.window, segments)


def extra_columns(mask: Mask, extra: ExtraColumns) -> Columns:
    """`beyond_window`: column g at position g (k_offset 0), visible iff q_pos - g >= window;
    `always`: every column visible (segments aside)."""
    segments = mask.q_segment_ids is not None and extra.segment_ids is not None
    if extra.visibility == ALWAYS:
        return Columns(False, 0, None, segments)
    shift = mask.window if mask.window is not None else 0
    return Columns(True, shift, None, segments)


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
    return ok


def kv_block_ranges(cols: Columns, q_offset, k_offset, t: int, bq: int, s: int, bk: int):
    """Per query block i: key blocks [lo_i, hi_i) that can hold a visible column.

    Returns lo, hi int32 [nq]. Offsets may be traced. Kernels visit `hi - lo` blocks (key block
    lo + it at step it) and skip the rest."""
    nq, nk = cdiv(t, bq), cdiv(s, bk)
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
    lo = jnp.clip(lo, 0, nk)
    return lo.astype(jnp.int32), jnp.clip(hi, lo, nk).astype(jnp.int32)


def q_block_ranges(cols: Columns, q_offset, k_offset, t: int, bq: int, s: int, bk: int):
    """Per key block j: query blocks [lo_j, hi_j) that can see one of its columns (the backward's
    view of the same mask). int32 [nk] each."""
    nq, nk = cdiv(t, bq), cdiv(s, bk)
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
    lo = jnp.clip(lo, 0, nq)
    return lo.astype(jnp.int32), jnp.clip(hi, lo, nq).astype(jnp.int32)


def segment_ranges(ids, block: int):
    """Per-block min and max segment id, int32 [B, n] each, of ids [B, L] (edge-padded). Two blocks
    with disjoint [min, max] ranges share no segment, so a kernel may skip the pair."""
    b, n = ids.shape[0], cdiv(ids.shape[1], block)
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
