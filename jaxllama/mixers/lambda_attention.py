"""Lambda ("Λ") attention of LM-Infinite (METHODS section 5) and its constant-size cache.

Query at position i, key at position j (G sink tokens, window L, distance ceiling D):
  - i - j in [0, L): ordinary RoPE score <R_i q_i, R_j k_j> / sqrt(H);
  - i - j >= L and j < G: <R_D q_i, k_j> / sqrt(H), the sink key un-rotated, the query rotated to D;
  - otherwise masked. One softmax over the union.

Both branches go through one `attend` call: the window is the mask's `window=L` on ordinary columns,
the far sinks are `beyond_window` `ExtraColumns` (query rotated to D against un-rotated keys,
visible iff i - g >= L). Since only the first G and the last L keys are ever read, `LambdaCache` holds G
un-rotated sink keys/values and a ring buffer of the last L rotated keys/values: its size does not
depend on the sequence length. With a cache a call appends T >= 1 tokens (chunked prefill and
one-token decode are one code path): the chunk attends to the ring buffer, to itself and to the
sinks.

Positions of the lambda rule are token indices, not the `positions` argument (which drives RoPE):
without a cache, the index in the row (or, with segment ids, in the segment: packed rows restart
the rule, sinks included, at every segment); with a cache, the slot minus the row's leading padding
(segment id 0 before its first real token), so a left-padded row of a generation batch computes
exactly what it computes alone. "Un-rotated" means rotated to position 0: the identity for every
RoPE type except those with an attention factor (yarn, longrope), where it keeps the factor on
both sides of the score, as the ordinary branch does.

Training with the sequence sharded over `seq` (`kernels.context_parallel` ring or allgather, the
mode the dense layers of a hybrid use) runs `parallel/halo.py`: each device receives the L - 1
keys before each of its chunks and its segments' G sinks, never the whole sequence.

Costs. The ring holds L entries though L - 1 would do (the published CBHybrid cache sizes count
L + G per layer). Packed rows (segment ids, no cache) gather each query's G sinks per query
(`parallel.halo.sink_attend`), a [B T G K H] gather: linear in T, as the window is.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxllama.config import LambdaConfig, ModelConfig
from jaxllama.kernels._common import merge_partials
from jaxllama.kernels.flash_attention.api import BEYOND_WINDOW, ExtraColumns, Mask, attend
from jaxllama.layers.rope import apply_rope
from jaxllama.mixers.attention import Attention, AttentionLayerConfig
from jaxllama.mixers.attention import hf_tensors as attention_tensors
from jaxllama.mixers.spec import MixerSpec, Rollback
from jaxllama.parallel.context import SEQ_AXIS
from jaxllama.parallel.halo import halo_lambda_attend, sink_attend
from jaxllama.sharding import mesh_axis_size
from jaxllama.typing import Hidden, Positions, SegmentIds


@dataclass(frozen=True)
class LambdaAttentionConfig(AttentionLayerConfig):
    """What a lambda layer is built with: the attention layer config and the `lambda:` knobs."""

    lambda_: LambdaConfig

    @classmethod
    def from_model(cls, cfg: ModelConfig) -> LambdaAttentionConfig:
        return cls(cfg.hidden_size, cfg.max_position_embeddings, cfg.attention, cfg.lambda_)

NO_SLOT = 2**30  # first_slot of a row that has seen no real token yet


@struct.dataclass
class LambdaCache:
    """Sinks: un-rotated k, v [B G K H] of each row's first G real tokens. Ring: rotated k, v
    [B L K H] of the last L slots, slot s stored at s % L. Segment ids (0 = empty or padding),
    the slot count, and where each row's real tokens begin (after its leading padding)."""

    sink_k: jax.Array
    sink_v: jax.Array
    sink_segment_ids: jax.Array  # [B G] int32
    ring_k: jax.Array
    ring_v: jax.Array
    ring_segment_ids: jax.Array  # [B L] int32
    first_slot: jax.Array  # [B] int32: slot of the row's first real token (NO_SLOT before any)
    length: jax.Array  # int32 scalar: slots written so far

    @classmethod
    def init(cls, cfg: LambdaAttentionConfig, batch: int, max_len: int, dtype) -> LambdaCache:
        """`max_len` is accepted for the common cache signature and ignored: the size is fixed."""
        del max_len
        lam, k = cfg.lambda_, cfg.attention.num_kv_heads
        sink = (batch, lam.global_tokens, k, cfg.head_dim)
        ring = (batch, lam.window, k, cfg.head_dim)
        return cls(sink_k=jnp.zeros(sink, dtype), sink_v=jnp.zeros(sink, dtype),
                   sink_segment_ids=jnp.zeros(sink[:2], jnp.int32),
                   ring_k=jnp.zeros(ring, dtype), ring_v=jnp.zeros(ring, dtype),
                   ring_segment_ids=jnp.zeros(ring[:2], jnp.int32),
                   first_slot=jnp.full((batch,), NO_SLOT, jnp.int32),
                   length=jnp.zeros((), jnp.int32))

    @staticmethod
    def logical_axes(cfg: LambdaAttentionConfig) -> LambdaCache:
        kv = ("batch", "cache_seq", "kv_heads", "head_dim")
        seg = ("batch", "cache_seq")
        return LambdaCache(sink_k=kv, sink_v=kv, sink_segment_ids=seg, ring_k=kv, ring_v=kv,
                           ring_segment_ids=seg, first_slot=("batch",), length=())

    def window_view(self):
        """Ring in chronological order: k, v [B L K H], segment ids [B L] of slots
        length-L .. length-1 (slots below 0 are empty, segment id 0)."""
        w = self.ring_k.shape[1]
        order = (self.length + jnp.arange(w)) % w
        return (jnp.take(self.ring_k, order, axis=1), jnp.take(self.ring_v, order, axis=1),
                jnp.take(self.ring_segment_ids, order, axis=1))

    def append(self, k_rot, k_raw, v, segment_ids) -> LambdaCache:
        """Write T new slots: rotated k_rot, un-rotated k_raw, v [B T K H], segment_ids [B T]."""
        start, t = self.length, k_rot.shape[1]
        g, w = self.sink_k.shape[1], self.ring_k.shape[1]
        real = segment_ids != 0
        first_here = jnp.where(jnp.any(real, axis=1), start + jnp.argmax(real, axis=1), NO_SLOT)
        first_slot = jnp.minimum(self.first_slot, first_here.astype(jnp.int32))
        # sinks: sink j of row b is slot first_slot[b] + j, chunk index first_slot[b] + j - start
        src = first_slot[:, None] + jnp.arange(g)[None, :] - start  # [B G]
        hit = (first_slot[:, None] != NO_SLOT) & (src >= 0) & (src < t)
        src = jnp.clip(src, 0, t - 1)

        def sink(old, new):
            idx = src.reshape(src.shape + (1,) * (new.ndim - 2))
            picked = jnp.take_along_axis(new, idx, axis=1).astype(old.dtype)
            return jnp.where(hit.reshape(hit.shape + (1,) * (old.ndim - 2)), picked, old)

        # ring: only the last min(T, L) tokens of the chunk survive; slot s goes to s % L
        n = min(t, w)
        slots = (start + t - n + jnp.arange(n)) % w

        def ring(old, new):
            return old.at[:, slots].set(new[:, t - n:].astype(old.dtype))

        return LambdaCache(
            sink_k=sink(self.sink_k, k_raw), sink_v=sink(self.sink_v, v),
            sink_segment_ids=sink(self.sink_segment_ids, segment_ids),
            ring_k=ring(self.ring_k, k_rot), ring_v=ring(self.ring_v, v),
            ring_segment_ids=ring(self.ring_segment_ids, segment_ids),
            first_slot=first_slot, length=start + t)

    def lead(self):
        """[B] leading padding of each row (0 before any real token): lambda positions are
        slot - lead, so a left-padded row computes what it computes alone."""
        return jnp.where(self.first_slot == NO_SLOT, 0, self.first_slot)


def segment_offsets(segment_ids):
    """Index of each token inside its segment, [B T] int32 (a segment = a run of equal ids)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class LambdaAttention(Attention):
    """Lambda attention with dense `Attention`'s projections and parameter names, so any HF Llama
    loads into it: (x [B T D], positions [B T], cache, segment_ids [B T]) -> (y [B T D], cache)."""

    cfg: LambdaAttentionConfig

    def rotations(self, x: Hidden, positions: Positions):
        """q, k rotated at `positions`; q rotated to D; k rotated to 0 ("un-rotated"); v."""
        c = self.cfg
        q, k, v = self.project(x)
        cos, sin = c.rope(positions)
        cos_d, sin_d = c.rope(jnp.full_like(positions, c.lambda_.limit_distance))
        cos_0, sin_0 = c.rope(jnp.zeros_like(positions))
        return (apply_rope(q, cos, sin), apply_rope(k, cos, sin), apply_rope(q, cos_d, sin_d),
                apply_rope(k, cos_0, sin_0), v)

    @nn.compact
    def __call__(self, x: Hidden, positions: Positions, cache: LambdaCache | None = None,
                 segment_ids: SegmentIds | None = None) -> tuple[Hidden, LambdaCache | None]:
        lam = self.cfg.lambda_
        q, k, q_d, k_0, v = self.rotations(x, positions)
        impl = self.kernels.attention
        if (cache is None and self.kernels.context_parallel != "none"
                and mesh_axis_size(SEQ_AXIS) > 1):
            # sequence sharded over `seq` (zigzag): whichever mode the dense layers use, a lambda
            # layer only needs a halo of L - 1 keys and its segment's G sinks (parallel/halo.py)
            out = halo_lambda_attend(q, k, q_d, k_0, v, segment_ids, window=lam.window,
                                     global_tokens=lam.global_tokens, implementation=impl)
        elif cache is None and segment_ids is None:
            # sinks are the first G tokens of the row
            g = min(lam.global_tokens, x.shape[1])
            sink = ExtraColumns(k_0[:, :g], v[:, :g], BEYOND_WINDOW, q=q_d) if g else None
            out = attend(q, k, v, Mask(causal=True, window=lam.window), extra=sink,
                         implementation=impl)
        elif cache is None:
            # packed rows: the window within the segment, plus each query's own segment's first G
            # tokens gathered per query (the halo path's `sink_attend` over one chunk, the whole
            # row): linear in T, where offering every token as a sink column would be quadratic
            mask = Mask(causal=True, window=lam.window, q_segment_ids=segment_ids,
                        kv_segment_ids=segment_ids)
            out, lse = attend(q, k, v, mask, implementation=impl, return_lse=True)
            if lam.global_tokens:
                out, _ = merge_partials(out, lse, *self.segment_sinks(q_d, k_0, v, segment_ids))
            out = out.astype(q.dtype)
        else:
            if segment_ids is None:
                segment_ids = jnp.ones(x.shape[:2], jnp.int32)
            out, cache = self.attend_cached(q, k, q_d, k_0, v, segment_ids, cache)
        return self.project_out(out), cache

    def segment_sinks(self, q_d, k_0, v, segment_ids):
        """(out [B T N H] float32, lse [B N T]) of each query over its segment's first G tokens
        that lie at least L before it (un-rotated keys, query rotated to D): `sink_attend` with
        the row as one chunk starting at position 0, so no sink comes from before it."""
        b, t = segment_ids.shape
        g, (kh, h) = self.cfg.lambda_.global_tokens, k_0.shape[2:]
        pos = jnp.arange(t, dtype=jnp.int32)
        start = pos - segment_offsets(segment_ids)  # [B T] where each token's segment begins
        none = (jnp.zeros((b, g, kh, h), k_0.dtype), jnp.zeros((b, g, kh, v.shape[3]), v.dtype),
                jnp.full((b, g), -1, jnp.int32))
        return sink_attend(q_d, k_0, v, segment_ids, start, pos, none,
                           window=self.cfg.lambda_.window, implementation=self.kernels.attention)

    def attend_cached(self, q, k, q_d, k_0, v, segment_ids, cache: LambdaCache):
        """The chunk's T queries over [ring (slots start-L .. start-1) | chunk (start ..
        start+T-1)] with the window, plus the sinks. Positions in the mask are slot - lead.
        One query (decode) reads the ring in place instead: same mask and attend, keys laid out
        without the per-step chronological copy and concatenation (its decode speed-up is measured in
        BENCHMARKS.md)."""
        lam = self.cfg.lambda_
        start, w = cache.length, cache.ring_k.shape[1]
        if q.shape[1] == 1:
            # one query (decode): after the append the ring holds exactly its window, slots
            # start-L+1 .. start in some rotation. Attention does not depend on key order, so the
            # ring is read in place (no chronological copy): its keys are given positions that
            # all pass the causal and window tests, and segment ids hide empty and padding slots.
            cache = cache.append(k, k_0, v, segment_ids)
            keys, vals = cache.ring_k.astype(q.dtype), cache.ring_v.astype(q.dtype)
            kv_seg, k_back = cache.ring_segment_ids, w - 1
        else:
            ring_k, ring_v, ring_seg = cache.window_view()
            cache = cache.append(k, k_0, v, segment_ids)
            keys = jnp.concatenate([ring_k.astype(q.dtype), k], axis=1)  # [B L+T K H]
            vals = jnp.concatenate([ring_v.astype(q.dtype), v], axis=1)
            kv_seg, k_back = jnp.concatenate([ring_seg, segment_ids], axis=1), w
        sink_k, sink_v = cache.sink_k.astype(q.dtype), cache.sink_v.astype(q.dtype)

        def one(q, keys, vals, q_seg, kv_seg, q_d, sink_k, sink_v, sink_seg, lead):
            mask = Mask(causal=True, window=lam.window, q_offset=start - lead,
                        k_offset=start - lead - k_back, q_segment_ids=q_seg,
                        kv_segment_ids=kv_seg)
            sink = None
            if lam.global_tokens:
                sink = ExtraColumns(sink_k, sink_v, BEYOND_WINDOW, q=q_d, segment_ids=sink_seg)
            return attend(q, keys, vals, mask, extra=sink, implementation=self.kernels.attention)

        args = (q, keys, vals, segment_ids, kv_seg, q_d, sink_k, sink_v, cache.sink_segment_ids)
        if q.shape[0] == 1:
            return one(*args, cache.lead()[0]), cache
        # rows with different leading padding have different offsets: one attend per row
        rows = jax.vmap(one)(*(a[:, None] for a in args), cache.lead())
        return rows[:, 0], cache


def flops_per_token(cfg: LambdaAttentionConfig, seq_len: int) -> float:
    """Scores and values over the keys a query sees, averaged over the T = seq_len queries:
    the window (query i sees min(i, L) keys) plus the far sinks (min(G, i - L) beyond L)."""
    t, w, g = seq_len, cfg.lambda_.window, cfg.lambda_.global_tokens
    window = t * t / 2 if t <= w else w * w / 2 + (t - w) * w
    far = t - w if t > w else 0
    sinks = far * far / 2 if far <= g else g * g / 2 + (far - g) * g
    return 2.0 * (window + sinks) / t * cfg.attention.num_heads * cfg.head_dim


def rollback_begin(cache: LambdaCache, t: int):
    """Speculative decoding (`Rollback`): before a call appending t <= L tokens, save the t ring
    slots it will overwrite (slots length .. length+t-1, at s % L), the length and first_slot."""
    w = cache.ring_k.shape[1]
    if t > w:
        raise ValueError(f"lambda layers undo at most window={w} tokens; a speculative step "
                         f"appends {t} (fewer draft tokens, or a larger model.lambda.window)")
    at = (cache.length + jnp.arange(t)) % w
    return cache, (cache.length, cache.first_slot, cache.ring_k[:, at], cache.ring_v[:, at],
                   cache.ring_segment_ids[:, at])


def rollback_end(cache: LambdaCache, saved, keep) -> LambdaCache:
    """Keep the first `keep` of the t appended slots: the ring slots of the rejected ones get
    their old entries back, and sinks written for them are hidden (segment id 0) until those
    slots are appended again. O(t + G) per call."""
    start, first_slot, old_k, old_v, old_seg = saved
    t, w, g = old_k.shape[1], cache.ring_k.shape[1], cache.sink_k.shape[1]
    at = (start + jnp.arange(t)) % w
    rejected = jnp.arange(t) >= keep  # [t]

    def put_back(ring, old):
        sel = rejected.reshape((1, t) + (1,) * (ring.ndim - 2))
        return ring.at[:, at].set(jnp.where(sel, old, ring[:, at]))

    # a row whose first real token came in this call keeps it only if that token was kept
    first_slot = jnp.where(cache.first_slot < start + keep, cache.first_slot, first_slot)
    sink_slot = first_slot[:, None] + jnp.arange(g)[None, :]  # [B G]; NO_SLOT rows are empty
    return cache.replace(
        ring_k=put_back(cache.ring_k, old_k), ring_v=put_back(cache.ring_v, old_v),
        ring_segment_ids=put_back(cache.ring_segment_ids, old_seg),
        sink_segment_ids=jnp.where(sink_slot >= start + keep, 0, cache.sink_segment_ids),
        first_slot=first_slot, length=start + keep)


SPEC = MixerSpec(
    kind="lambda",
    module=LambdaAttention,
    cache=LambdaCache,
    config_cls=LambdaAttentionConfig,
    config_field="lambda_",
    context_limited=False,  # G + L keys at distances clipped to D, whatever the position
    # either mode runs the halo exchange (parallel/halo.py): the window bounds what is read
    context_parallel=("ring", "allgather"),
    uses_rope=True,
    padding="segment_ids",
    cache_growth="constant",
    hf_tensors=attention_tensors,  # dense attention's weights: only the mask differs
    flops_per_token=flops_per_token,
    rollback=Rollback(rollback_begin, rollback_end),
)

__all__ = ["SPEC", "LambdaAttention", "LambdaAttentionConfig", "LambdaCache", "segment_offsets"]
