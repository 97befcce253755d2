"""Sequence parallelism for the selective scans over the `seq` mesh axis (issue 13 item 4).

Call `sequence_ssd_scan` / `sequence_selective_scan` inside `shard_map` (with `check_vma=False`,
as parallel/context.py does: the scans' zero carries are not marked varying) with the per-token
arrays sharded over `axis_name` (A, D and the initial state replicated). The scan is linear in its state,
so the true state entering a piece is a function of the pieces before it only through two numbers
per piece, its pass-through decay and its final state from zero:

  1. each piece scans from a zero state (`ssd_scan` / `selective_scan`, any implementation):
     y0, F_q (its final state), and T_q, the decay that carries a state across the whole piece:
     exp(sum dt A) when the piece continues the segment it was entered with and has no reset, 0
     otherwise (a reset, or a first document that is not the one before it);
  2. (T_q, F_q) of every piece are all-gathered (a [pieces B H P N] state each, tiny beside the
     activations) and folded in sequence order, incoming_{q+1} = T_q incoming_q + F_q, incoming_0 =
     the initial state: a scan over the shard states. Its last carry is the global final state,
     returned on every device;
  3. each piece corrects its outputs with its true incoming state where that state reaches them
     (positions of the piece's first segment, if that segment continues from the previous piece):
     Mamba2 explicitly, y_t += exp(cum_t) C_t . incoming (cum_t: sum of dt A up to t, a per-head
     scalar, so this is one [B S H P] einsum); Mamba1 by linearity, as the scan of zero inputs from
     the incoming state (its decay is per channel and state, and writing exp(cum_t) out would hold
     [B S D N]; the second scan holds only the state).

Segment ids cross devices correctly: which document a piece starts in is decided from the last
nonzero id of all pieces before it (gathered with the states), so packed rows reset and padding
is skipped exactly as in the unsharded scan.

The zigzag layout (parallel/layout.py, used by dense ring attention): device r holds sequence
chunks r and 2W-1-r. We keep that layout for SSM layers too (no re-layout per layer kind, so a
hybrid moves no activations between its attention and SSM layers) and make the combine
zigzag-aware: with `layout="zigzag"` each device's shard is two pieces, both scanned in one call
(stacked on the batch axis), and the fold of step 2 runs over all 2W pieces in true sequence
order. `layout="contiguous"`: one piece per device, device r holding chunk r.

The mixers' causal depthwise conv needs the W-1 tokens before each piece: `conv_halo` returns them
(from the previous piece's device, zeros before the sequence start), and applied to the segment
ids it tells the conv where a document starts (padding id 0 in the halo before the sequence).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxllama.kernels.ssm_scan.api import selective_scan, ssd_scan
from jaxllama.kernels.ssm_scan.reference import segment_runs

LAYOUTS = ("contiguous", "zigzag")
F32 = jnp.float32


# ----------------------------------------------------------------------------- pieces


def _pieces_per_device(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"sequence scan: layout {layout!r} is not one of {LAYOUTS}")
    return 1 if layout == "contiguous" else 2


def piece_order(ways: int, layout: str) -> np.ndarray:
    """[ways * k] int: entry q is the gathered index (device * k + slot) of sequence piece q."""
    k = _pieces_per_device(layout)
    if k == 1:
        return np.arange(ways)
    order = np.empty(2 * ways, np.int64)
    for r in range(ways):
        order[r], order[2 * ways - 1 - r] = 2 * r, 2 * r + 1
    return order


def _my_pieces(axis_name: str, ways: int, layout: str):
    """Sequence index of each local piece (traced int32 [k])."""
    r = lax.axis_index(axis_name)
    if _pieces_per_device(layout) == 1:
        return r[None]
    return jnp.stack([r, 2 * ways - 1 - r])


def _split(a, k: int):
    """[B S ...] -> [k*B S/k ...]: the local pieces stacked on the batch axis (None passes)."""
    if a is None or k == 1:
        return a
    s = a.shape[1]
    if s % k:
        raise ValueError(f"sequence scan: a zigzag shard of {s} tokens is not two equal pieces")
    return jnp.concatenate([a[:, :s // k], a[:, s // k:]], axis=0)


def _join(a, k: int):
    """Inverse of `_split`."""
    if k == 1:
        return a
    b = a.shape[0] // k
    return jnp.concatenate([a[i * b:(i + 1) * b] for i in range(k)], axis=1)


def _gather_pieces(a, axis_name: str, ways: int, layout: str):
    """Per-piece values [k*B ...] of every device -> [pieces B ...] in sequence order."""
    k = _pieces_per_device(layout)
    g = lax.all_gather(a, axis_name)  # [W k*B ...]
    g = g.reshape(ways * k, a.shape[0] // k, *a.shape[1:])
    return g[piece_order(ways, layout)]


# ----------------------------------------------------------------------------- combine


def _first_last_ids(seg):
    """(first, last) nonzero id per row [B] of segment ids [B S] (0 where none)."""
    nz = seg != 0
    pos = jnp.arange(seg.shape[1])
    first = jnp.take_along_axis(seg, jnp.argmax(nz, axis=1)[:, None], 1)[:, 0]
    last = jnp.take_along_axis(seg, jnp.argmax(jnp.where(nz, pos, -1), axis=1)[:, None], 1)[:, 0]
    return jnp.where(nz.any(1), first, 0), jnp.where(nz.any(1), last, 0)


def _continues(seg, axis_name, ways, layout):
    """[k*B] bool: the state entering each local piece reaches its first segment (the piece's
    first nonzero id is the last nonzero id before the piece, or none came before, or the piece
    is all padding)."""
    if seg is None:
        return None
    first, last = _first_last_ids(seg)
    lasts = _gather_pieces(last, axis_name, ways, layout)  # [pieces B]

    def fill(prev, cur):  # last nonzero id before each piece
        return jnp.where(cur != 0, cur, prev), prev

    _, before = lax.scan(fill, jnp.zeros_like(lasts[0]), lasts)
    mine = _my_pieces(axis_name, ways, layout)
    before = jnp.concatenate(list(before[mine]), axis=0)  # [k*B]
    return (before == 0) | (first == 0) | (first == before)


def _incoming(decay, final, initial, axis_name, ways, layout):
    """(incoming state of each local piece [k*B ...], global final state [B ...]) by the fold
    incoming_{q+1} = T_q incoming_q + F_q over the gathered pieces in sequence order."""
    k = _pieces_per_device(layout)
    ts = _gather_pieces(decay, axis_name, ways, layout)
    fs = _gather_pieces(final, axis_name, ways, layout)
    pad = (None,) * (fs.ndim - ts.ndim)

    def fold(state, tf):
        t, f = tf
        return t[(...,) + pad] * state + f, state

    h0 = jnp.zeros_like(fs[0]) if initial is None else initial.astype(F32)
    total, incoming = lax.scan(fold, h0, (ts, fs))
    mine = _my_pieces(axis_name, ways, layout)
    return jnp.concatenate([incoming[mine[i]] for i in range(k)], axis=0), total


def _reach(seg, valid, run, cont):
    """[k*B S] bool: positions the incoming state reaches (first local segment, continued)."""
    if seg is None:
        return None
    return valid & (run == 0) & cont[:, None]


# ----------------------------------------------------------------------------- scans


def sequence_ssd_scan(x, dt, A, B, C, *, D=None, initial_state=None, segment_ids=None,
                      axis_name: str = "seq", layout: str = "contiguous",
                      chunk_size: int | None = None, implementation: str = "auto"):
    """`ssd_scan` over a sequence sharded on `axis_name` (inside shard_map): x [B S_local H P],
    dt [B S_local H], B, C [B S_local G N], segment_ids [B S_local] the local shards in `layout`;
    A, D and initial_state [B H P N] replicated. Returns (local y [B S_local H P] in x.dtype, the
    global final state [B H P N] float32, the same on every device). Module docstring: how."""
    k = _pieces_per_device(layout)
    ways = lax.axis_size(axis_name)
    xs, dts, Bs, Cs, seg = (_split(a, k) for a in (x, dt, B, C, segment_ids))
    y0, final = ssd_scan(xs, dts, A, Bs, Cs, D=D, segment_ids=seg, chunk_size=chunk_size,
                         implementation=implementation)
    b2, s = xs.shape[:2]
    valid, run = segment_runs(seg, b2, s)
    a = jnp.where(valid[..., None], dts.astype(F32), 0.0) * A.astype(F32)  # [kB S H]
    cum = jnp.cumsum(a, axis=1)
    cont = _continues(seg, axis_name, ways, layout)
    decay = jnp.exp(cum[:, -1])  # [kB H]
    if seg is not None:
        decay = decay * (cont & (run[:, -1] == 0))[:, None]
    incoming, total = _incoming(decay, final, initial_state, axis_name, ways, layout)
    g = Bs.shape[2]
    h, p = xs.shape[2:]
    inc = incoming.reshape(b2, g, h // g, p, -1)
    corr = jnp.einsum("bsgn,bgrpn->bsgrp", Cs.astype(F32), inc).reshape(b2, s, h, p)
    corr = jnp.exp(cum)[..., None] * corr
    reach = _reach(seg, valid, run, cont)
    if reach is not None:
        corr = jnp.where(reach[..., None, None], corr, 0.0)
    return _join((y0.astype(F32) + corr).astype(x.dtype), k), total


def sequence_selective_scan(u, delta, A, B, C, *, D=None, initial_state=None, segment_ids=None,
                            axis_name: str = "seq", layout: str = "contiguous",
                            implementation: str = "auto"):
    """`selective_scan` over a sequence sharded on `axis_name` (inside shard_map): u, delta
    [B S_local D], B, C [B S_local G N], segment_ids [B S_local] local shards in `layout`; A, D and
    initial_state [B D N] replicated. Returns (local y [B S_local D] in u.dtype, the global final
    state [B D N] float32 on every device). Module docstring: how."""
    k = _pieces_per_device(layout)
    ways = lax.axis_size(axis_name)
    us, ds, Bs, Cs, seg = (_split(a, k) for a in (u, delta, B, C, segment_ids))
    y0, final = selective_scan(us, ds, A, Bs, Cs, D=D, segment_ids=seg,
                               implementation=implementation)
    b2, s = us.shape[:2]
    valid, run = segment_runs(seg, b2, s)
    dsum = jnp.where(valid[..., None], ds.astype(F32), 0.0).sum(1)  # [kB D]
    decay = jnp.exp(dsum[..., None] * A.astype(F32))  # [kB D N]
    cont = _continues(seg, axis_name, ways, layout)
    if seg is not None:
        decay = decay * (cont & (run[:, -1] == 0))[:, None, None]
        incoming_mask = cont[:, None, None]
    incoming, total = _incoming(decay, final, initial_state, axis_name, ways, layout)
    if seg is not None:
        incoming = jnp.where(incoming_mask, incoming, 0.0)
    # the carried part alone: zero inputs from the incoming state (resets and padding as in y0)
    corr, _ = selective_scan(jnp.zeros_like(us), ds, A, Bs, Cs, initial_state=incoming,
                             segment_ids=seg, implementation=implementation)
    return _join((y0.astype(F32) + corr.astype(F32)).astype(u.dtype), k), total


def conv_halo(x, width: int, *, axis_name: str = "seq", layout: str = "contiguous"):
    """The `width` tokens before each local piece, for a causal conv of width + 1 (Mamba's W - 1):
    x [B S_local ...] -> [B k width ...] (k = 1 contiguous, 2 zigzag: the halo of each local piece
    in local order), zeros before the sequence start. Inside shard_map over `axis_name`."""
    k = _pieces_per_device(layout)
    ways = lax.axis_size(axis_name)
    xs = _split(x, k)
    if xs.shape[1] < width:
        raise ValueError(f"conv_halo: pieces of {xs.shape[1]} tokens are shorter than the halo "
                         f"({width})")
    tails = _gather_pieces(xs[:, xs.shape[1] - width:], axis_name, ways, layout)  # [P B w ...]
    before = jnp.concatenate([jnp.zeros_like(tails[:1]), tails[:-1]], axis=0)
    mine = _my_pieces(axis_name, ways, layout)
    return jnp.stack([before[mine[i]] for i in range(k)], axis=1)


__all__ = ["LAYOUTS", "conv_halo", "piece_order", "sequence_selective_scan", "sequence_ssd_scan"]
