"""Focused Transformer attention (LongLLaMA, METHODS section 7): kinds `fot` and `fot_local`.

`fot` is a LongLLaMA memory layer, `fot_local` one of its other layers. Both attend within a local
window of W = `max_position_embeddings` tokens, with RoPE at positions relative to the oldest
local entry: the cache keeps the local keys un-rotated with their positions and rotates them on
read, as the reference does. A memory layer also reads its memory, the (key, value) pairs of
everything that left the local window: keys rotated as if at position 0 (not rotated at all, nor
are that layer's local queries and keys, with `mem_positionals: false`), stored in `mem_dtype`.
Local and memory scores share one float32 softmax: memory is `attend`'s extra key columns with
the `always` visibility ("every written memory slot", unwritten slots carry segment id -1), never
concatenated with the local keys.

Windowing (every call, with or without a cache, splits its T tokens the reference's way):
  - the first T - `last_context_length` tokens are prefix windows of W tokens from the start (the
    last may be short); the rest is the tail;
  - a piece of n tokens first empties the local window when the local entries plus n exceed W
    (memory layers move them into memory, `fot_local` layers drop them), then attends to the
    local window, itself (causal) and memory, and is written into the local window;
  - a prefix window that found the local window empty (a fresh prompt) then moves straight into
    memory: a window never sees itself through memory, and the prompt's tail becomes the local
    window. With a non-empty local window (a later prompt, a decode step) only the first rule
    applies; a decode step that would overflow the window moves the whole window first, so the
    new token's RoPE position restarts at 0.
So a whole prompt in one call computes what the reference's `LongLlamaForCausalLM(input_ids)`
computes, and the engine feeds FoT prompts whole (`SPEC.prefill_chunk`). Chunked prefill and
decode equal a full forward while nothing leaves the window (the contract test). The split is
the same for every row of a batch: a row shorter than the longest is left-padded, so its windows
start inside the padding (exact reference windows: one prompt length per batch).

Capacities. The local window holds min(max(W, last_context_length), max_len) entries and the
memory of a `fot` layer max_len slots (a sequence of max_len tokens never holds more). Writes past
the memory are dropped and counted (`mem_length` > capacity): the layer's output turns NaN and
`check_memory` raises naming the sizes, so an overflow is never silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxllama.config import FoTConfig, ModelConfig
from jaxllama.kernels._common import merge_partials
from jaxllama.kernels.flash_attention.api import ALWAYS, ExtraColumns, Mask, attend
from jaxllama.layers.basic import dtype_of
from jaxllama.layers.rope import apply_rope
from jaxllama.mixers.attention import Attention, AttentionLayerConfig
from jaxllama.mixers.attention import hf_tensors as attention_tensors
from jaxllama.mixers.spec import MixerSpec
from jaxllama.typing import Hidden, Positions, SegmentIds

_FAR = 2**30  # above every position: the minimum of no real entry


@dataclass(frozen=True)
class FoTAttentionConfig(AttentionLayerConfig):
    """What a FoT layer is built with: the attention layer config and the `fot:` knobs.
    `memory`: a `fot` (memory) layer; `FoTLocalAttentionConfig` is the `fot_local` one."""

    fot: FoTConfig
    memory: ClassVar[bool] = True

    @classmethod
    def from_model(cls, cfg: ModelConfig) -> FoTAttentionConfig:
        return cls(cfg.hidden_size, cfg.max_position_embeddings, cfg.attention, cfg.fot)

    @property
    def window(self) -> int:  # W: the local window, the model's max_position_embeddings
        return self.context_length

    @property
    def local_capacity(self) -> int:
        """Local entries a sequence ever holds: W, or a longer prompt tail."""
        return max(self.window, self.fot.last_context_length)

    @property
    def positional(self) -> bool:
        """RoPE on this layer's queries and keys (memory layers: `mem_positionals`)."""
        return not self.memory or self.fot.mem_positionals

    def pieces(self, t: int) -> list[tuple[int, int, bool]]:
        """(start, size, is_prefix) of the pieces a call of t tokens is split into (module
        docstring): prefix windows of W over the first t - last_context_length, then the tail."""
        p = max(t - self.fot.last_context_length, 0)
        out = [(s, min(self.window, p - s), True) for s in range(0, p, self.window)]
        return out + [(p, t - p, False)]


@dataclass(frozen=True)
class FoTLocalAttentionConfig(FoTAttentionConfig):
    """A LongLLaMA layer without memory: the local window only, what leaves it is dropped."""

    memory: ClassVar[bool] = False


@struct.dataclass
class FoTCache:
    """Local window: un-rotated k, v [B C K H], positions and segment ids [B C] (0 = padding),
    `length` entries. Memory: k (rotated as if at position 0, or un-rotated), v [B M K H] in
    `mem_dtype`, segment ids [B M], `mem_length` entries ever written (more than M: overflow).
    M is 0 for `fot_local` layers."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array  # [B C] int32, absolute
    segment_ids: jax.Array  # [B C] int32
    length: jax.Array  # int32 scalar
    mem_k: jax.Array
    mem_v: jax.Array
    mem_segment_ids: jax.Array  # [B M] int32
    mem_length: jax.Array  # int32 scalar

    @classmethod
    def init(cls, cfg: FoTAttentionConfig, batch: int, max_len: int, dtype) -> FoTCache:
        kh, h = cfg.attention.num_kv_heads, cfg.head_dim
        c, m = min(cfg.local_capacity, max_len), (max_len if cfg.memory else 0)
        mem_dtype = dtype_of(cfg.fot.mem_dtype)
        zero = jnp.zeros((), jnp.int32)
        return cls(k=jnp.zeros((batch, c, kh, h), dtype), v=jnp.zeros((batch, c, kh, h), dtype),
                   positions=jnp.zeros((batch, c), jnp.int32),
                   segment_ids=jnp.zeros((batch, c), jnp.int32), length=zero,
                   mem_k=jnp.zeros((batch, m, kh, h), mem_dtype),
                   mem_v=jnp.zeros((batch, m, kh, h), mem_dtype),
                   mem_segment_ids=jnp.zeros((batch, m), jnp.int32), mem_length=zero)

    @staticmethod
    def logical_axes(cfg: FoTAttentionConfig) -> FoTCache:
        kv, seq = ("batch", "cache_seq", "kv_heads", "head_dim"), ("batch", "cache_seq")
        return FoTCache(k=kv, v=kv, positions=seq, segment_ids=seq, length=(), mem_k=kv,
                        mem_v=kv, mem_segment_ids=seq, mem_length=())

    @property
    def capacity(self) -> int:  # M
        return self.mem_k.shape[-3]

    def write(self, k, v, positions, segment_ids) -> FoTCache:
        """Append n entries to the local window: k, v [B n K H], positions, segment ids [B n]."""
        at = self.length
        put = lambda old, new: jax.lax.dynamic_update_slice_in_dim(
            old, new.astype(old.dtype), at, axis=1)
        return self.replace(k=put(self.k, k), v=put(self.v, v),
                            positions=put(self.positions, positions),
                            segment_ids=put(self.segment_ids, segment_ids),
                            length=at + k.shape[1])


def check_memory(caches) -> None:
    """Raise (one line) if any FoT memory in a model cache overflowed (host-side check)."""
    for c in jax.tree.leaves(caches, is_leaf=lambda x: isinstance(x, FoTCache)):
        if isinstance(c, FoTCache) and c.capacity:
            written = int(jnp.max(c.mem_length))
            if written > c.capacity:
                raise ValueError(f"fot: memory overflow: {written} entries for a memory of "
                                 f"{c.capacity} slots (init the cache with a larger max_len)")


# ----------------------------------------------------------------------------- pure pieces


def _rotate(cfg: FoTAttentionConfig, x, rel):
    """x [B T N H] rotated at relative positions rel [B T] (identity without positionals)."""
    if not cfg.positional:
        return x
    cos, sin = cfg.rope(rel)
    return apply_rope(x, cos, sin)


def _to_memory(cfg: FoTAttentionConfig, cache: FoTCache) -> FoTCache:
    """Empty the local window: a memory layer appends its entries to memory (keys rotated as if
    at position 0), a `fot_local` layer drops them."""
    if not cfg.memory:
        return cache.replace(length=jnp.zeros_like(cache.length))
    c, m = cache.k.shape[1], cache.capacity
    slot = jnp.arange(c)
    idx = jnp.where(slot < cache.length, cache.mem_length + slot, m)  # m: out of range, dropped
    k0 = _rotate(cfg, cache.k, jnp.zeros(cache.positions.shape, jnp.int32))

    def put(old, new):
        return old.at[:, idx].set(new.astype(old.dtype), mode="drop")

    return cache.replace(mem_k=put(cache.mem_k, k0), mem_v=put(cache.mem_v, cache.v),
                         mem_segment_ids=put(cache.mem_segment_ids, cache.segment_ids),
                         mem_length=cache.mem_length + cache.length,
                         length=jnp.zeros_like(cache.length))


def _relative(positions, real):
    """positions [B S] minus the row's smallest real one (0 where not real), and that minimum."""
    lo = jnp.min(jnp.where(real, positions, _FAR), axis=1, keepdims=True)
    lo = jnp.where(lo == _FAR, 0, lo)
    return jnp.where(real, positions - lo, 0), lo


def _read(cfg: FoTAttentionConfig, impl: str, q, positions, seg, cache: FoTCache, at):
    """The n queries (written at local slots at .. at+n-1) over the local window (causal) and
    the written memory slots, one softmax: out [B n N H]."""
    n = q.shape[1]
    real = (jnp.arange(cache.k.shape[1]) < at + n)[None] & (cache.segment_ids != 0)
    rel_k, lo = _relative(cache.positions, real)
    q = _rotate(cfg, q, jnp.maximum(positions - lo, 0))
    keys = _rotate(cfg, cache.k.astype(q.dtype), rel_k)
    mask = Mask(causal=True, q_offset=at, q_segment_ids=seg, kv_segment_ids=cache.segment_ids)
    m = cache.capacity
    extra = None
    if cfg.memory and m:
        written = jnp.arange(m)[None] < jnp.minimum(cache.mem_length, m)
        extra = ExtraColumns(cache.mem_k.astype(q.dtype), cache.mem_v.astype(q.dtype), ALWAYS,
                             segment_ids=jnp.where(written, cache.mem_segment_ids, -1))
    top_k = cfg.fot.mem_top_k
    if extra is not None and 0 < top_k < m:
        out, lse = attend(q, keys, cache.v.astype(q.dtype), mask, implementation=impl,
                          return_lse=True)
        out = merge_partials(out, lse, *_top_k_memory(q, extra, seg, top_k))[0].astype(q.dtype)
    else:
        out = attend(q, keys, cache.v.astype(q.dtype), mask, extra=extra, implementation=impl)
    if cfg.memory:  # an overflowed memory lost entries: never a silent result
        out = jnp.where(cache.mem_length > m, jnp.nan, out)
    return out


def _top_k_memory(q, mem: ExtraColumns, seg, k: int):
    """Each query head over its k highest-scoring visible memory slots only (`fot.mem_top_k`):
    (out [B T N H] float32, lse [B N T]) for `merge_partials` with the local window; exactly the
    full memory read when k covers every visible slot. q [B T N H], memory k, v [B M K H]."""
    b, t, n, h = q.shape
    kh = mem.k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    # [B T K G H] x [B M K H] -> [B K G T M]
    s = jnp.einsum("btkgh,bmkh->bkgtm", qg, mem.k, preferred_element_type=jnp.float32) * h**-0.5
    ok = (seg[:, :, None] == mem.segment_ids[:, None, :])[:, None, None]  # [B 1 1 T M]
    top, idx = jax.lax.top_k(jnp.where(ok, s, -jnp.inf), k)  # [B K G T k]
    vt = jnp.moveaxis(mem.v, 2, 1)  # [B K M H]
    vals = vt[jnp.arange(b)[:, None, None, None, None], jnp.arange(kh)[None, :, None, None, None],
              idx]  # [B K G T k H]
    lse = jax.nn.logsumexp(top, axis=-1)  # -inf where nothing is visible
    p = jnp.where(jnp.isfinite(top), jnp.exp(top - jnp.where(jnp.isfinite(lse), lse, 0)[..., None]),
                  0.0)
    # [B K G T k] x [B K G T k H] -> [B T K G H]
    out = jnp.einsum("bkgtj,bkgtjh->btkgh", p, vals.astype(jnp.float32))
    return out.reshape(b, t, n, h), lse.reshape(b, n, t)


def _piece(cfg: FoTAttentionConfig, impl: str, q, k, v, positions, seg, cache: FoTCache,
           pending):
    """One piece of n tokens through the cache (module docstring): (out [B n N H], cache).
    `pending` (traced bool): the local window holds a fresh prompt's prefix window, which moves
    to memory now, before this piece's attention (after its own, as the reference orders it)."""
    n = q.shape[1]
    flush = pending | (cache.length + n > cfg.window)
    cache = jax.lax.cond(flush, lambda c: _to_memory(cfg, c), lambda c: c, cache)
    at = cache.length
    cache = cache.write(k, v, positions, seg)
    return _read(cfg, impl, q, positions, seg, cache, at), cache


def windows(cfg: FoTAttentionConfig, impl: str, q, k, v, positions, seg, cache: FoTCache):
    """A call's T tokens as the reference splits them: q [B T N H], un-rotated k, v [B T K H],
    positions, seg [B T] -> (out [B T N H], cache). Full prefix windows share one scanned body;
    a prefix window that found the local window empty is moved to memory by the next piece (a
    call ends with its tail, so nothing is left pending between calls)."""
    pieces = cfg.pieces(q.shape[1])
    if max(size for _, size, _ in pieces) > cache.k.shape[1]:
        raise ValueError(f"fot: a piece of {max(s for _, s, _ in pieces)} tokens does not fit "
                         f"the local cache of {cache.k.shape[1]} entries (init the cache with "
                         f"max_len >= the sequence length)")
    arrays = (q, k, v, positions, seg)
    outs, pending = [], jnp.zeros((), bool)
    full = [p for p in pieces if p[2] and p[1] == cfg.window]
    if full:
        w, nf = cfg.window, len(full)

        def split(a):  # [B nf*W ...] -> [nf B W ...]
            return jnp.moveaxis(a[:, :nf * w].reshape(a.shape[0], nf, w, *a.shape[2:]), 1, 0)

        def body(carry, xs):
            c, pending = carry
            fresh = c.length == 0
            out, c = _piece(cfg, impl, *xs, c, pending)
            return (c, pending | fresh), out

        (cache, pending), out = jax.lax.scan(body, (cache, pending),
                                             tuple(split(a) for a in arrays))
        outs.append(jnp.moveaxis(out, 0, 1).reshape(q.shape[0], nf * w, *out.shape[3:]))
    for start, size, prefix in pieces[len(full):]:
        if size:
            part = tuple(a[:, start:start + size] for a in arrays)
            fresh = cache.length == 0
            out, cache = _piece(cfg, impl, *part, cache, pending)
            pending = prefix & (pending | fresh)
            outs.append(out)
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], cache


def _alone(cfg: FoTAttentionConfig, impl: str, q, k, v, positions, seg):
    """One window and no memory (a call no longer than `last_context_length`, no cache)."""
    real = jnp.ones(positions.shape, bool) if seg is None else seg != 0
    rel, _ = _relative(positions, real)
    mask = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    return attend(_rotate(cfg, q, rel), _rotate(cfg, k, rel), v, mask, implementation=impl)


def cross_batch(cfg: FoTAttentionConfig, impl: str, q, k, v, positions, seg):
    """A memory layer's training pass with cross-batch range d = `fot.cross_batch_range`
    (METHODS section 7): row b attends to its own row (causal, RoPE at `positions`) and to all T
    keys and values of rows b-1 .. b-d, those keys rotated as if at position 0, visible only to
    queries of the same segment id (a document: `doc_aware` packing gives a document's parts one
    id across rows); one softmax. Gradients flow into the other rows' keys and values. Rows are
    shifted along the batch axis (`jnp.roll`), so a batch sharded over `data` exchanges the d
    neighbouring rows across shard edges. q [B T N H], k, v [B T K H] -> out [B T N H]."""
    b = q.shape[0]
    seg = jnp.ones(positions.shape, jnp.int32) if seg is None else seg
    mask = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    qr, kr = _rotate(cfg, q, positions), _rotate(cfg, k, positions)
    k0 = _rotate(cfg, k, jnp.zeros_like(positions))
    shifts = range(1, min(cfg.fot.cross_batch_range, b - 1) + 1)
    if not shifts:
        return attend(qr, kr, v, mask, implementation=impl)
    rows = jnp.arange(b)[:, None]
    ks = [jnp.roll(k0, j, axis=0) for j in shifts]  # [B T K H]: row b holds row b-j
    vs = [jnp.roll(v, j, axis=0) for j in shifts]
    ss = [jnp.where(rows >= j, jnp.roll(seg, j, axis=0), -1) for j in shifts]
    extra = ExtraColumns(jnp.concatenate(ks, 1), jnp.concatenate(vs, 1), ALWAYS,
                         segment_ids=jnp.concatenate(ss, 1))  # [B d*T K H]
    return attend(qr, kr, v, mask, extra=extra, implementation=impl)


class FoTAttention(Attention):
    """FoT attention with dense `Attention`'s projections and parameter names (any HF Llama or
    LongLLaMA loads into it): (x [B T D], positions [B T], cache, segment_ids [B T]) ->
    (y [B T D], cache). Without a cache a call longer than `last_context_length` runs the
    reference's windowed forward through a temporary cache of its own length; with
    `fot.cross_batch_range` > 0 it is a cross-batch training pass (`cross_batch`), standard
    causal attention in `fot_local` layers."""

    cfg: FoTAttentionConfig

    @nn.compact
    def __call__(self, x: Hidden, positions: Positions, cache: FoTCache | None = None,
                 segment_ids: SegmentIds | None = None) -> tuple[Hidden, FoTCache | None]:
        c, impl = self.cfg, self.kernels.attention
        q, k, v = self.project(x)
        t, d = x.shape[1], c.fot.cross_batch_range
        if cache is None and d and c.memory:
            out = cross_batch(c, impl, q, k, v, positions, segment_ids)
        elif cache is None and (d or t <= c.fot.last_context_length):
            out = _alone(c, impl, q, k, v, positions, segment_ids)
        else:
            seg = jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids
            run = cache if cache is not None else FoTCache.init(c, x.shape[0], t, k.dtype)
            out, run = windows(c, impl, q, k, v, positions, seg, run)
            cache = run if cache is not None else None
        return self.project_out(out), cache


def flops_per_token(cfg: FoTAttentionConfig, seq_len: int) -> float:
    """Scores and values over the keys the mean query sees: about half the local window, plus
    (memory layers) the memory, which holds everything before the window: seq_len / 2 in all."""
    seen = seq_len if cfg.memory else min(seq_len, cfg.window)
    return 2.0 * seen * cfg.attention.num_heads * cfg.head_dim


def whole_prompt(cfg: FoTAttentionConfig, n: int) -> int:
    """FoT windows a prompt itself: the engine feeds it whole (and unpadded)."""
    del cfg
    return n


def fot_pattern(num_layers: int, mem_layers) -> tuple[str, ...]:
    """LongLLaMA's layers as kinds: `fot` at the memory layers, `fot_local` elsewhere."""
    mem = set(mem_layers)
    return tuple(SPEC.kind if i in mem else LOCAL_SPEC.kind for i in range(num_layers))


def mem_layers_of(cfg: ModelConfig) -> tuple[int, ...]:
    """Inverse of `fot_pattern`: the memory layers; ValueError naming a layer of another kind."""
    for i, kind in enumerate(cfg.layer_pattern):
        if kind not in (SPEC.kind, LOCAL_SPEC.kind):
            raise ValueError(f"layer {i} is a {kind} layer (a LongLLaMA model has only "
                             f"{SPEC.kind} and {LOCAL_SPEC.kind} layers)")
    return tuple(i for i, kind in enumerate(cfg.layer_pattern) if kind == SPEC.kind)


SPEC = MixerSpec(
    kind="fot",
    module=FoTAttention,
    cache=FoTCache,
    config_cls=FoTAttentionConfig,
    config_field="fot",
    context_limited=False,  # the local window at relative positions, the rest through memory
    context_parallel=(),
    uses_rope=True,
    padding="segment_ids",
    cache_growth="linear",  # the memory grows with the sequence; the local window does not
    hf_tensors=attention_tensors,  # LongLLaMA's tensors are Llama's
    flops_per_token=flops_per_token,
    prefill_chunk=whole_prompt,
)

LOCAL_SPEC = MixerSpec(
    kind="fot_local",
    module=FoTAttention,
    cache=FoTCache,
    config_cls=FoTLocalAttentionConfig,
    config_field="fot",
    context_limited=False,  # what leaves the window is dropped
    context_parallel=(),
    uses_rope=True,
    padding="segment_ids",
    cache_growth="constant",  # the local window only
    hf_tensors=attention_tensors,
    flops_per_token=flops_per_token,
    prefill_chunk=whole_prompt,
)

__all__ = ["LOCAL_SPEC", "SPEC", "FoTAttention", "FoTAttentionConfig", "FoTCache",
           "FoTLocalAttentionConfig", "check_memory", "cross_batch", "fot_pattern", "mem_layers_of", "windows"]
