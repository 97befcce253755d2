"""Speculative decoding: a cheap draft proposes k tokens, the model checks them in one call.

Each round of the on-device loop (a `lax.while_loop`, like the plain decode loop):

1. the draft proposes d_1 .. d_k after the pending token x (the last token sampled, not yet in
   the cache). `NgramDraft` (prompt lookup) copies the k tokens that followed the latest earlier
   occurrence of the context's last n-gram (n = `max_ngram` down to 1): no second model, a point
   mass as draft distribution. `ModelDraft` runs a smaller model sharing the vocabulary for k + 1
   one-token steps on its own cache (the last one only writes d_k into that cache);
2. the model runs [x, d_1 .. d_k] as one cached call of k + 1 tokens: logits for every position;
3. acceptance. Greedy: d_i is kept while it equals the model's argmax, and the model's argmax at
   the first mismatch (or after d_k, a bonus token) follows, so the output is plain greedy
   decoding token for token. Sampling: rejection sampling (Leviathan et al. 2023; Chen et al.
   2023): d_i is kept with probability min(1, p(d_i) / q(d_i)); at the first rejection a token is
   drawn from normalize(max(p - q, 0)), after k acceptances from p. Here p and q are the model's
   and the draft's distributions after the same temperature / top-k / top-p, so every emitted
   token is distributed exactly as plain sampling's;
4. the batch keeps m + 1 tokens per row, m = the fewest acceptances over the rows still running
   (a prefix of each row's own output is still an exact sample, and one cache length serves all
   rows), and every layer's cache undoes the rest through its kind's `Rollback` (mixers/spec.py:
   dense caches by length, the lambda ring by restoring overwritten slots).

The loop carries the token history [B S] in cache-slot order (the n-gram lookup reads it), the
model's and the draft's caches, the output buffer and two counters (rounds, accepted draft tokens)
from which `GenerationOutput` reports the acceptance rate.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllama.config import ModelConfig
from jaxllama.inference import engine as engine_lib
from jaxllama.inference.decode import decode_caches
from jaxllama.inference.engine import Engine, GenerationError, GenerationOutput
from jaxllama.inference.sampling import nucleus_mask
from jaxllama.mixers import spec_of
from jaxllama.model import init_cache

NO_TOKEN = -1  # history entry of a padding slot: never part of an n-gram match


class DraftError(ValueError):
    """A draft that cannot serve this model (vocabulary, layer kind, window); one line."""


@dataclass(frozen=True)
class NgramDraft:
    """Prompt lookup: draft `tokens` tokens copied from after the latest earlier occurrence of the
    context's last n-gram, for n = `max_ngram` down to 1 (none found: the pending token
    repeated, which the model then mostly rejects)."""

    tokens: int = 4
    max_ngram: int = 3

    def __post_init__(self):
        if self.tokens < 1 or self.max_ngram < 1:
            raise DraftError(f"ngram draft: tokens ({self.tokens}) and max_ngram "
                             f"({self.max_ngram}) must be >= 1")

    @property
    def key(self):
        return ("ngram", self.tokens, self.max_ngram)


@dataclass(eq=False)
class ModelDraft:
    """A smaller model with the same vocabulary proposes `tokens` tokens per round (sampled with
    the same temperature / top-k / top-p as the model, argmax when greedy). Its `Engine` (built
    on first use, same platform defaults) prefills and lays out its weights and cache."""

    cfg: ModelConfig
    params: Any
    tokens: int = 4
    _engine: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.tokens < 1:
            raise DraftError(f"model draft: tokens must be >= 1, got {self.tokens}")

    @property
    def key(self):
        return ("model", id(self), self.tokens)

    def engine(self, like):
        """The draft's engine, with `like`'s prefill chunk and bucket so that its cache slots
        line up with the model's."""
        if self._engine is None:
            self._engine = Engine(self.cfg, self.params, prefill_chunk=like.prefill_chunk,
                                  min_bucket=like.min_bucket)
        return self._engine


# ----------------------------------------------------------------------------- caches


def _groups(cfg: ModelConfig, unstacked: bool):
    """(kind, stacked) of each entry of the model cache in this layout."""
    return ([(k, False) for k in cfg.layer_pattern] if unstacked
            else [(k, True) for k, _ in cfg.runs])


def check_rollback(cfg: ModelConfig, who: str = "model") -> None:
    """DraftError naming the first layer kind of `cfg` that cannot undo tokens."""
    for i, kind in enumerate(cfg.layer_pattern):
        if spec_of(kind).rollback is None:
            raise DraftError(f"speculative decoding: {kind} layers (layer {i} of the {who}) "
                             "cannot undo rejected tokens (their spec has no rollback)")


def begin_caches(cfg: ModelConfig, caches: tuple, t: int, unstacked: bool):
    """Every layer's `Rollback.begin` before a call appending t tokens: (caches, saved)."""
    out, saved = [], []
    for (kind, stacked), cache in zip(_groups(cfg, unstacked), caches):
        begin = spec_of(kind).rollback.begin
        c, s = (jax.vmap(lambda c, b=begin: b(c, t))(cache) if stacked else begin(cache, t))
        out.append(c)
        saved.append(s)
    return tuple(out), tuple(saved)


def end_caches(cfg: ModelConfig, caches: tuple, saved: tuple, keep, unstacked: bool) -> tuple:
    """Every layer's `Rollback.end`: keep the first `keep` tokens of the bracketed call."""
    out = []
    for (kind, stacked), cache, s in zip(_groups(cfg, unstacked), caches, saved):
        end = spec_of(kind).rollback.end
        out.append(jax.vmap(lambda c, s, e=end: e(c, s, keep))(cache, s) if stacked
                   else end(cache, s, keep))
    return tuple(out)


# ----------------------------------------------------------------------------- drafting


def warped_logits(logits, temperature, top_p, *, top_k: int, use_top_p: bool):
    """float32 logits [.. V] after temperature, top-k and top-p, -inf outside the kept set:
    `categorical` of them is `sampling.sample`'s distribution (exact ties at a cut aside)."""
    x = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, -jnp.inf)
    if use_top_p:
        desc = -jnp.sort(-x, axis=-1)
        cut = jnp.min(jnp.where(nucleus_mask(desc, top_p), desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x >= cut, x, -jnp.inf)
    return x


def ngram_propose(hist, cur, k: int, max_ngram: int):
    """Draft [B k] int32 from the history hist [B S] (token of each cache slot, NO_TOKEN for
    padding and unwritten slots; cur = slot of the pending token, the context's last): the k
    tokens after the latest j < cur where hist[j-n+1 .. j] == hist[cur-n+1 .. cur], for the
    largest n <= max_ngram that has a match. Unknown entries become the pending token."""
    b, s = hist.shape
    idx = jnp.arange(s)
    pending = jax.lax.dynamic_index_in_dim(hist, cur, axis=1, keepdims=False)  # [B]
    found = jnp.zeros((b,), bool)
    start = jnp.zeros((b,), jnp.int32)  # slot of the first drafted token
    for n in range(max_ngram, 0, -1):
        ok = (idx < cur) & (idx >= n - 1)
        ok = jnp.broadcast_to(ok, (b, s))
        for i in range(n):  # hist[j - i] == hist[cur - i] for every j
            tail = jax.lax.dynamic_index_in_dim(hist, cur - i, axis=1, keepdims=True)  # [B 1]
            shifted = jnp.roll(hist, i, axis=1)  # shifted[:, j] = hist[:, j - i]
            ok &= (shifted == tail) & (tail != NO_TOKEN)
        last = jnp.max(jnp.where(ok, idx, -1), axis=1)  # latest match, -1 if none
        use = ~found & (last >= 0)
        start = jnp.where(use, last + 1, start)
        found |= use
    at = start[:, None] + jnp.arange(k)[None, :]  # [B k]
    draft = jnp.take_along_axis(hist, jnp.clip(at, 0, s - 1), axis=1)
    known = found[:, None] & (at <= cur) & (draft != NO_TOKEN)
    return jnp.where(known, draft, pending[:, None]).astype(jnp.int32)


# ----------------------------------------------------------------------------- acceptance


def accept_greedy(draft, logits):
    """draft [B k], model logits [B k+1 V] -> (output [B k+1], accepted [B]): the model's argmax
    at every position; row b's first accepted[b] outputs equal its draft."""
    out = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    match = draft == out[:, :-1]
    return out, jnp.sum(jnp.cumprod(match, axis=1), axis=1).astype(jnp.int32)


def accept_sampled(draft, q, p_logits, key):
    """Rejection sampling. draft [B k] drawn from q [B k V] (probabilities), model's warped
    logits p_logits [B k+1 V] -> (output [B k+1], accepted [B]): output i is d_{i+1} for i <
    accepted, a draw from normalize(max(p_i - q_i, 0)) at i = accepted (from p_k when all k were
    accepted); each row's outputs up to and including position accepted are an exact sample of
    the model's distribution."""
    k = draft.shape[1]
    p = jax.nn.softmax(p_logits, axis=-1)  # [B k+1 V]
    pd = jnp.take_along_axis(p[:, :k], draft[..., None], axis=-1)[..., 0]  # [B k]
    qd = jnp.take_along_axis(q, draft[..., None], axis=-1)[..., 0]
    k_accept, k_fix = jax.random.split(key)
    u = jax.random.uniform(k_accept, draft.shape)
    ok = u * qd < pd  # u < p / q without dividing by a zero q
    accepted = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    resid = jnp.maximum(p[:, :k] - q, 0.0)
    norm = jnp.sum(resid, axis=-1, keepdims=True)
    resid = jnp.where(norm > 0, resid / jnp.where(norm > 0, norm, 1.0), p[:, :k])
    fix_p = jnp.concatenate([resid, p[:, k:]], axis=1)  # [B k+1 V]
    fix = jax.random.categorical(k_fix, jnp.log(fix_p), axis=-1).astype(jnp.int32)
    pos = jnp.arange(k + 1)[None, :]
    padded = jnp.concatenate([draft, draft[:, :1]], axis=1)
    return jnp.where(pos < accepted[:, None], padded, fix), accepted


# ----------------------------------------------------------------------------- the loop


@struct.dataclass
class SpecState:
    """The speculative loop's carry: `DecodeState`'s fields plus the history [B S'] (token per
    cache slot), `cur` (slot of the pending token), the draft's caches (() for n-grams), and the
    rounds / accepted-draft-token counters."""

    step: jax.Array
    tok: jax.Array  # [B]
    positions: jax.Array  # [B]
    caches: Any
    done: jax.Array  # [B]
    out: jax.Array  # [B n]
    hist: jax.Array  # [B S']
    cur: jax.Array  # int32 scalar
    draft_caches: Any
    rounds: jax.Array
    accepted: jax.Array


def _draft_tokens(engine, draft, dweights, s: SpecState, key, temperature, top_p, *, greedy,
                  top_k, use_top_p):
    """(draft [B k], q [B k V] or None, draft caches bracketed by `begin`, saved)."""
    k = draft.tokens
    if isinstance(draft, NgramDraft):
        d = ngram_propose(s.hist, s.cur, k, draft.max_ngram)
        q = None if greedy else jax.nn.one_hot(d, engine.cfg.vocab_size, dtype=jnp.float32)
        return d, q, s.draft_caches, ()
    de = draft.engine(engine)
    model = de.layout.model(de.decode_cfg)
    caches, saved = begin_caches(de.decode_cfg, s.draft_caches, k + 1, de.layout.unstacked)
    keys = jax.random.split(key, k + 1)

    def one(carry, i):
        tok, caches = carry
        logits, caches = model.apply({"params": dweights}, tok[:, None],
                                     (s.positions + i)[:, None], caches,
                                     jnp.ones((tok.shape[0], 1), jnp.int32))
        logits = logits[:, 0]
        if greedy:
            return (jnp.argmax(logits, -1).astype(jnp.int32), caches), (tok, tok)
        w = warped_logits(logits, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
        nxt = jax.random.categorical(keys[i], w, axis=-1).astype(jnp.int32)
        return (nxt, caches), (nxt, jax.nn.softmax(w, axis=-1))

    # k + 1 steps: the first k propose d_1 .. d_k, the last writes d_k into the draft's cache
    (last, caches), (toks, probs) = jax.lax.scan(one, (s.tok, caches), jnp.arange(k + 1))
    del last
    if greedy:  # step i passed on its input: [x, d_1 .. d_k]
        return toks[1:].T, None, caches, saved
    return toks[:k].T, jnp.swapaxes(probs[:k], 0, 1), caches, saved


def spec_loop(engine, draft, weights, state: SpecState, limit, key, temperature, top_p, eos,
              pad_id, *, greedy, top_k, use_top_p):
    """The on-device speculative loop until step `limit` or every row is done (module
    docstring); `weights` = (the model's decode weights, the draft's or ())."""
    model = engine.layout.model(engine.decode_cfg)
    cfg, k = engine.decode_cfg, draft.tokens
    tw, dweights = weights
    sampling = {"greedy": greedy, "top_k": top_k, "use_top_p": use_top_p}

    def cond(s: SpecState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: SpecState):
        rk = jax.random.fold_in(key, s.step)
        k_draft, k_accept = jax.random.split(rk)
        d, q, dcaches, dsaved = _draft_tokens(engine, draft, dweights, s, k_draft, temperature,
                                              top_p, **sampling)
        x = jnp.concatenate([s.tok[:, None], d], axis=1)  # [B k+1]
        caches, saved = begin_caches(cfg, s.caches, k + 1, engine.layout.unstacked)
        logits, caches = model.apply({"params": tw}, x, s.positions[:, None] + jnp.arange(k + 1),
                                     caches, jnp.ones(x.shape, jnp.int32))
        if greedy:
            outs, acc = accept_greedy(d, logits)
        else:
            p = warped_logits(logits, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
            outs, acc = accept_sampled(d, q, p, k_accept)
        m = jnp.min(jnp.where(s.done, k, acc))  # every running row keeps m + 1 tokens
        caches = end_caches(cfg, caches, saved, m + 1, engine.layout.unstacked)
        if isinstance(draft, ModelDraft):
            de = draft.engine(engine)
            dcaches = end_caches(de.decode_cfg, dcaches, dsaved, m + 1, de.layout.unstacked)
        pos = jnp.arange(k + 1)[None, :]
        is_eos = jnp.isin(outs, eos) & (pos <= m)
        after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
        outs = jnp.where(s.done[:, None] | after_eos | (pos > m), pad_id, outs)
        new_tok = jax.lax.dynamic_index_in_dim(outs, m, axis=1, keepdims=False)
        return SpecState(
            step=s.step + m + 1, tok=new_tok, positions=s.positions + m + 1, caches=caches,
            done=s.done | jnp.any(is_eos, axis=1),
            out=jax.lax.dynamic_update_slice(s.out, outs, (0, s.step)),
            hist=jax.lax.dynamic_update_slice(s.hist, outs, (0, s.cur + 1)),
            cur=s.cur + m + 1, draft_caches=dcaches, rounds=s.rounds + 1,
            accepted=s.accepted + m)

    return jax.lax.while_loop(cond, body, state)


def generate(engine, draft, prompts, max_new_tokens, sampling, seed, eos_ids, pad_id, max_len,
             on_token):
    """`Engine.generate` with a draft (see the module docstring); the same `GenerationOutput`,
    with the round and accepted-token counts."""
    if isinstance(draft, str):
        raise DraftError(f"draft {draft!r}: pass an NgramDraft or a ModelDraft")
    k = draft.tokens
    check_rollback(engine.cfg)
    if isinstance(draft, ModelDraft):
        check_rollback(draft.cfg, "draft")
        if draft.cfg.vocab_size != engine.cfg.vocab_size:
            raise DraftError(f"the draft's vocabulary ({draft.cfg.vocab_size} tokens) differs "
                             f"from the model's ({engine.cfg.vocab_size}): it must share the "
                             "tokenizer")
    tokens, positions, segment_ids, lengths, new, _ = engine.prepare(prompts, max_new_tokens,
                                                                    max_len)
    b, bucket = tokens.shape
    # a round may run k + 1 tokens past `new`
    slots = engine_lib.round_up(bucket + new + k + 1, engine_lib.CACHE_ROUND)
    for eng in (engine, draft.engine(engine)) if isinstance(draft, ModelDraft) else (engine,):
        _check_window(eng, b, slots, k + 1)
    engine._compile_seconds = 0.0
    greedy, top_k, use_top_p = sampling.static(engine.cfg.vocab_size)
    static = {"greedy": greedy, "top_k": top_k, "use_top_p": use_top_p}
    knobs = (jax.random.key(seed), *sampling.dynamic(),
             jnp.asarray(list(eos_ids) or [-1], jnp.int32), jnp.asarray(pad_id, jnp.int32))

    def prefill(eng):
        """Prefill `eng`'s model over the prompt chunks: (logits, stacked cache, seconds)."""
        cache = eng._init_cache_fn(b, slots)
        chunk = min(bucket, eng.prefill_chunk)
        parts = [tuple(jnp.asarray(a[:, c:c + chunk]) for a in (tokens, positions, segment_ids))
                 for c in range(0, bucket, chunk)]
        fn = eng._executable("prefill", eng._prefill_fn, (eng.params, *parts[0], cache))
        t0 = time.perf_counter()
        for part in parts:
            logits, cache = fn(eng.params, *part, cache)
        logits.block_until_ready()
        return logits, cache, time.perf_counter() - t0

    logits, cache, prefill_s = prefill(engine)
    dweights, dcaches = (), ()
    if isinstance(draft, ModelDraft):
        de = draft.engine(engine)
        de._compile_seconds = 0.0
        _, dcache, ds = prefill(de)
        prefill_s += ds
        to_decode = jax.jit(partial(_draft_decode_caches, de), donate_argnums=(0,))
        dweights = de.decode_weights()
        engine._compile_seconds += de._compile_seconds
    out_len = slots - bucket + 1
    first = engine._executable("first", engine._first_fn,
                               (cache, logits, jnp.asarray(lengths), *knobs),
                               {**static, "out_len": out_len})
    t0 = time.perf_counter()
    state = first(cache, logits, jnp.asarray(lengths), *knobs)
    engine_lib.free_donated(cache)
    if isinstance(draft, ModelDraft):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            dcaches = to_decode(dcache)
        engine_lib.free_donated(dcache)
    hist = np.where(segment_ids != 0, tokens, NO_TOKEN)
    hist = np.concatenate([hist, np.full((b, slots + k + 2 - bucket), NO_TOKEN)], axis=1)
    hist[:, bucket] = np.asarray(state.tok)
    state = SpecState(step=state.step, tok=state.tok, positions=state.positions,
                      caches=state.caches, done=state.done, out=state.out,
                      hist=jnp.asarray(hist, jnp.int32), cur=jnp.asarray(bucket, jnp.int32),
                      draft_caches=dcaches, rounds=jnp.zeros((), jnp.int32),
                      accepted=jnp.zeros((), jnp.int32))
    weights = (engine.decode_weights(), dweights)
    fns = engine.__dict__.setdefault("_spec_fns", {})
    if draft.key not in fns:
        fns[draft.key] = jax.jit(partial(spec_loop, engine, draft), donate_argnums=(1,),
                                 static_argnames=tuple(static))
    decode_s0 = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        loop = engine._executable(("spec", draft.key), fns[draft.key],
                                  (weights, state, jnp.int32(0), *knobs), static)
    t0 = time.perf_counter()
    if on_token is None:
        state = loop(weights, state, jnp.int32(new), *knobs)
    else:
        state = engine._stream(loop, weights, state, new, knobs, eos_ids, on_token)
    out = np.asarray(state.out)
    steps = min(int(state.step), new)
    decode_s = decode_s0 + time.perf_counter() - t0
    out = out[:, :steps]
    is_eos = np.isin(out, np.asarray(list(eos_ids), np.int32))
    first_eos = np.where(is_eos.any(1), is_eos.argmax(1) + 1, steps)
    return GenerationOutput(tokens=out, lengths=first_eos.astype(np.int32),
                            stopped=is_eos.any(1), prompt_lengths=lengths,
                            prefill_seconds=prefill_s, decode_seconds=decode_s,
                            compile_seconds=engine._compile_seconds,
                            draft_rounds=int(state.rounds), draft_accepted=int(state.accepted),
                            draft_tokens=k)


def _check_window(engine, batch: int, slots: int, t: int) -> None:
    """GenerationError when a layer of `engine`'s model cannot undo t tokens (e.g. more than a
    lambda window), found by tracing the rollback on the cache shapes: before any compilation."""
    cfg, unstacked = engine.decode_cfg, engine.layout.unstacked
    try:
        jax.eval_shape(lambda: begin_caches(
            cfg, init_cache(cfg, batch, slots, engine.cache_dtype, unstacked=unstacked), t,
            unstacked))
    except ValueError as e:
        raise GenerationError(str(e).splitlines()[0]) from None


def _draft_decode_caches(de, cache):
    return decode_caches(de.decode_cfg, cache, de.layout)


__all__ = ["DraftError", "ModelDraft", "NgramDraft", "accept_greedy",
           "accept_sampled", "begin_caches", "check_rollback", "end_caches", "generate",
           "ngram_propose", "spec_loop", "warped_logits"]
