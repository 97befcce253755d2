"""Lambda attention with the sequence sharded over `seq`: a halo exchange, not a ring.

A lambda query (METHODS section 5) reads only the keys of its window (the last L positions) and
the first G tokens of its segment (the sinks). So with the sequence split over W devices in the
zigzag layout (`layout.py`: device r holds chunks r and 2W-1-r of C tokens), each local chunk j
needs, besides itself:

- the halo: the last L - 1 rotated keys/values before the chunk, i.e. the tails of chunks j - 1,
  j - 2, ... (one chunk when L <= C + 1), fetched with static `ppermute`s from wherever the
  zigzag layout put them;
- the remote sinks: the first G tokens of the segment that runs into the chunk from before
  (packed rows restart the rule at every segment, as the unsharded path does), which all lie in
  earlier chunks where that segment is the chunk's last. Every chunk publishes the sink part of
  its last segment (at most G tokens, un-rotated keys and values), one all-gather shares these
  2W x G tokens, and each chunk picks its segment's G.

Where segments start is found from a per-chunk summary (first and last segment id, last internal
boundary: 3 integers per row and chunk), also all-gathered. Per device this holds C + L - 1 + 2WG
keys, whatever the total length. Per chunk, one `attend` over the window (halo + chunk) and one
over each query's own G sinks, merged by log-sum-exp. A query's sinks are the tokens at its
segment's start + i (query rotated to D, keys un-rotated): remote ones from the all-gather, local
ones gathered from the chunk, per query, in blocks of queries. Giving every local token to the
kernel as a potential sink column instead (what the unsharded packed path does) would make the
chunk's sink work quadratic in C: the `beyond_window` columns have no window. Gradients are JAX's
transposes of the collectives and gathers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxllama.kernels._common import merge_partials
from jaxllama.kernels.flash_attention.api import Mask, attend
from jaxllama.parallel.context import SEQ_AXIS, _specs
from jaxllama.sharding import mesh_axis_size

F32 = jnp.float32


def _chunk(device: int, slot: int, ways: int) -> int:
    """Natural chunk index held by `device` in `slot` (0: chunk r, 1: chunk 2W-1-r)."""
    return device if slot == 0 else 2 * ways - 1 - device


def _home(chunk: int, ways: int) -> tuple[int, int]:
    """(device, slot) holding natural chunk `chunk`."""
    return (chunk, 0) if chunk < ways else (2 * ways - 1 - chunk, 1)


def _from_behind(pieces, hop: int, axis_name: str, ways: int):
    """For each local slot, `pieces[slot']` of the chunk `hop` chunks before it in natural order
    (zeros where there is none): static ppermutes, one per (source slot, destination slot)."""
    out = []
    for ds in (0, 1):
        got = jnp.zeros_like(pieces[ds])
        for ss in (0, 1):
            pairs = []
            for dev in range(ways):
                src = _chunk(dev, ds, ways) - hop
                if src >= 0 and _home(src, ways)[1] == ss:
                    pairs.append((_home(src, ways)[0], dev))
            if pairs:  # exactly one of the two sends reaches each device: add them
                got = got + jax.lax.ppermute(pieces[ss], axis_name, pairs)
        out.append(got)
    return out


def _natural(x, axis_name: str, ways: int):
    """All-gather per-slot data x [2, ...] of every device into natural chunk order [2W, ...]."""
    g = jax.lax.all_gather(x, axis_name)  # [W 2 ...]
    return jnp.concatenate([g[:, 0], g[::-1, 1]], axis=0)


def _segment_starts(seg, r, c: int, axis_name: str, ways: int):
    """seg [2 B C] local segment ids -> (start [2 B C]: global position where each token's
    segment begins, carried [2 B]: that of each chunk's first token)."""
    pos = jnp.stack([_chunk_pos(r, s, c, ways) for s in (0, 1)])[:, None, :]  # [2 1 C]
    inner = jnp.concatenate([jnp.zeros_like(seg[..., :1], bool),
                             seg[..., 1:] != seg[..., :-1]], axis=-1)  # [2 B C]
    last_inner = jnp.max(jnp.where(inner, pos, -1), axis=-1)  # [2 B]
    summary = jnp.stack([seg[..., 0], seg[..., -1], last_inner], axis=-1)  # [2 B 3]
    nat = _natural(summary, axis_name, ways)  # [2W B 3]
    first, last, inner_nat = nat[..., 0], nat[..., 1], nat[..., 2]
    starts = jnp.arange(2 * ways)[:, None] * c  # [2W 1]
    at_start = jnp.concatenate([jnp.ones_like(first[:1], bool), first[1:] != last[:-1]], axis=0)
    bound = jnp.maximum(inner_nat, jnp.where(at_start, starts, -1))  # last segment start in chunk
    before = jnp.concatenate([jnp.full_like(bound[:1], -1),
                              jax.lax.cummax(bound, axis=0)[:-1]], axis=0)
    carried_nat = jnp.where(at_start, starts, before)  # [2W B]
    carried = jnp.stack([carried_nat[_chunk_index(r, s, ways)] for s in (0, 1)])  # [2 B]
    start = jnp.maximum(carried[..., None], jax.lax.cummax(jnp.where(inner, pos, -1), axis=2))
    return start, carried


def _chunk_index(r, slot: int, ways: int):
    return r if slot == 0 else 2 * ways - 1 - r


def _chunk_pos(r, slot: int, c: int, ways: int):
    return _chunk_index(r, slot, ways) * c + jnp.arange(c)


def halo_lambda_local(q, k, q_d, k_0, v, seg, *, window: int, global_tokens: int,
                      axis_name: str, ways: int, implementation: str):
    """Lambda attention of the local zigzag rows (inside shard_map over `axis_name`).

    q, q_d [B 2C N H] (rotated at the positions; rotated to D), k, k_0 [B 2C K H] (rotated;
    un-rotated), v [B 2C K H], seg [B 2C] int32. Returns out [B 2C N H] in q.dtype."""
    c, w, g = q.shape[1] // 2, window, global_tokens
    r = jax.lax.axis_index(axis_name)
    split = lambda x: jnp.stack([x[:, :c], x[:, c:]])  # [B 2C ...] -> [2 B C ...]
    q2, k2, qd2, k02, v2, seg2 = (split(a) for a in (q, k, q_d, k_0, v, seg))

    # the halo: the last `w - 1` positions before each chunk, oldest first
    hl = w - 1
    keys, vals, kseg = [k2], [v2], [seg2]
    needed = -(-hl // c)  # chunks the halo spans; no more than the chunks before exist
    for hop in range(1, min(needed, 2 * ways - 1) + 1):
        n = c if hop < needed else hl - (needed - 1) * c
        pk, pv, ps = (_from_behind((a[0][:, c - n:], a[1][:, c - n:]), hop, axis_name, ways)
                      for a in (k2, v2, seg2))
        exists = jnp.stack([_chunk_index(r, s, ways) - hop >= 0 for s in (0, 1)])
        keys.insert(0, jnp.stack(pk))
        vals.insert(0, jnp.stack(pv))
        kseg.insert(0, jnp.where(exists[:, None, None], jnp.stack(ps), -1))
    keys, vals, kseg = (jnp.concatenate(a, axis=2) for a in (keys, vals, kseg))
    halo = keys.shape[2] - c

    if g:
        start, carried = _segment_starts(seg2, r, c, axis_name, ways)
        pos = jnp.stack([_chunk_pos(r, s, c, ways) for s in (0, 1)])  # [2 C]
        pk, pv, pseg = _published_sinks(k02, v2, seg2, start, pos, g)
        nat_k, nat_v, nat_seg = (_natural(a, axis_name, ways) for a in (pk, pv, pseg))
        rk, rv, rseg = _remote_sinks(nat_k, nat_v, nat_seg, carried, pos[:, 0], c, g)

    outs = []
    for s in (0, 1):
        mask = Mask(causal=True, window=w, q_offset=0, k_offset=-halo, q_segment_ids=seg2[s],
                    kv_segment_ids=kseg[s])
        out, lse = attend(q2[s], keys[s], vals[s], mask, implementation=implementation,
                          return_lse=True)
        if g:
            s_out, s_lse = sink_attend(qd2[s], k02[s], v2[s], seg2[s], start[s], pos[s],
                                       (rk[s], rv[s], rseg[s]), window=w,
                                       implementation=implementation)
            out, _ = merge_partials(out, lse, s_out, s_lse)
        outs.append(out.astype(q.dtype))
    return jnp.concatenate(outs, axis=1)


SINK_BLOCK = 2048  # queries per step of `sink_attend`: bounds its gathered [B block G K H] keys


def sink_attend(q_d, k_0, v, seg, start, pos, remote, *, window: int, implementation: str):
    """Each query of one chunk over its own segment's G sink tokens, those at least `window`
    before it. q_d [B C N H] (rotated to D); k_0, v [B C K H] (un-rotated keys, values of the
    chunk); seg, start [B C] (segment id; global position of the segment's first token); pos [C]
    global positions; remote = (k, v [B G K H], segment ids [B G]): the sinks of the segment that
    runs into the chunk from before (`_remote_sinks`). Sink i of a query is the token at
    start + i: from `remote` where that lies before the chunk, else gathered from the chunk.

    The queries' keys differ from query to query, so each query is one kernel row of its own
    (batch B x block, one query over G columns), in blocks of `SINK_BLOCK` queries under
    `jax.checkpoint`: the work and the memory are linear in C. Returns out [B C N H] float32 and
    lse [B N C] (-inf where a query sees no sink)."""
    rk, rv, rseg = remote
    b, c, n, h = q_d.shape
    g = rk.shape[1]
    bq = math.gcd(c, SINK_BLOCK)

    def block(xs):
        qd_i, seg_i, start_i, pos_i = xs  # [B bq N H], [B bq], [B bq], [bq]
        want = start_i[..., None] + jnp.arange(g)  # [B bq G] global positions of the sinks
        local = want - pos[0]  # index in the chunk; < 0: before the chunk (remote)
        idx = jnp.clip(local, 0, c - 1)
        pick = jax.vmap(lambda a, i: a[i])  # per row: [C K H] at [bq G] -> [bq G K H]
        here = (local >= 0)[..., None, None]
        sk = jnp.where(here, pick(k_0, idx), rk[:, None])  # [B bq G K H]
        sv = jnp.where(here, pick(v, idx), rv[:, None])
        ok = (pos_i[None, :, None] - want >= window) & (
            (local >= 0) | (rseg[:, None, :] == seg_i[..., None]))  # [B bq G]
        rows = lambda a: a.reshape((b * bq,) + a.shape[2:])
        mask = Mask(causal=False, q_segment_ids=jnp.ones((b * bq, 1), jnp.int32),
                    kv_segment_ids=rows(ok).astype(jnp.int32))
        out, lse = attend(rows(qd_i)[:, None], rows(sk), rows(sv), mask,
                          implementation=implementation, return_lse=True)
        return out.reshape(b, bq, n, h).astype(F32), lse.reshape(b, bq, n)  # lse [B bq N]

    blocks = lambda a, axis: jnp.moveaxis(
        a.reshape(a.shape[:axis] + (c // bq, bq) + a.shape[axis + 1:]), axis, 0)
    out, lse = jax.lax.map(jax.checkpoint(block), (blocks(q_d, 1), blocks(seg, 1),
                                                   blocks(start, 1), blocks(pos, 0)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, c, n, h)  # [nb B bq N H] -> [B C N H]
    lse = jnp.transpose(lse, (1, 3, 0, 2)).reshape(b, n, c)  # [nb B bq N] -> [B N C]
    return out, lse


def _published_sinks(k_0, v, seg, start, pos, g: int):
    """What each local chunk shares: the sink tokens of its last segment (slot i = the token at
    that segment's start + i, where it lies in this chunk). k_0, v [2 B C K H] -> [2 B G K H];
    segment ids [2 B G] (-1: empty slot)."""
    c = seg.shape[-1]
    idx = start[..., -1:] + jnp.arange(g) - pos[:, None, :1]  # [2 B G] local index
    ok = (idx >= 0) & (idx < c)
    idx = jnp.clip(idx, 0, c - 1)
    take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 3)), axis=2)
    return take(k_0), take(v), jnp.where(ok, take(seg), -1)


def _remote_sinks(nat_k, nat_v, nat_seg, carried, chunk_start, c: int, g: int):
    """Sinks of the segment running into each local chunk from before: slot i is the token at
    `carried + i`, found in the published sinks of its chunk (where that segment is the last).
    nat_* [2W B G ...] -> [2 B G ...]; segment ids -1 where the token is not before the chunk."""
    want = carried[..., None] + jnp.arange(g)  # [2 B G] global positions
    ok = want < chunk_start[:, None, None]
    src = jnp.clip(want // c, 0, nat_seg.shape[0] - 1)  # [2 B G] natural chunk
    bi = jnp.arange(nat_seg.shape[1])[None, :, None]
    gi = jnp.arange(g)[None, None, :]
    pick = lambda a: a[src, bi, gi]
    return pick(nat_k), pick(nat_v), jnp.where(ok, pick(nat_seg), -1)


def halo_lambda_attend(q, k, q_d, k_0, v, segment_ids=None, *, window: int, global_tokens: int,
                       implementation: str = "auto"):
    """Lambda attention with T sharded over `seq` in the zigzag layout: q, q_d [B T N H]; k, k_0,
    v [B T K H]; `segment_ids` [B T] (None = one segment). Returns out [B T N H]. The caller
    checks that `seq` has more than one device."""
    ways = mesh_axis_size(SEQ_AXIS)
    if q.shape[1] % (2 * ways):
        raise ValueError(f"sequence length {q.shape[1]} is not divisible by 2 x seq axis {ways}")
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    qkv, seg = _specs(q, k, mesh)
    fn = functools.partial(halo_lambda_local, window=window, global_tokens=global_tokens,
                           axis_name=SEQ_AXIS, ways=ways, implementation=implementation)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv,) * 5 + (seg,), out_specs=qkv,
                         check_vma=False)(q, k, q_d, k_0, v, segment_ids)
