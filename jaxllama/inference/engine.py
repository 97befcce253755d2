"""Batched generation: a jitted prefill and a jitted on-device decode loop over a preallocated cache.

Shapes and compilation. Prompts are left-padded to a *bucket* (16, 32, 64, ... up to
`prefill_chunk`, then multiples of it) and the cache to `bucket + max_new_tokens` rounded up to 128
slots, so one compiled prefill and one compiled decode loop serve every prompt of a bucket;
nothing recompiles per token or per prompt length. Padding gets segment id 0 (masked for every
real token, see `KVCache`); each row's positions start at 0 at its first real token, so a padded
row computes exactly what it computes alone. Prompts longer than `prefill_chunk` are prefilled
chunk by chunk through the same compiled function (bounded attention memory).

Decode loop. A `lax.while_loop` runs on device: forward one token per row, sample, write the
token into a preallocated [B, n] buffer, mark rows that produced an EOS id (they then emit the pad
id), and stop when every row is done or the step bound is reached. The bound is a traced argument,
so one compiled loop serves both uses: without streaming, one dispatch runs the whole generation;
with streaming, each dispatch runs `stream_every` tokens (default 1) on the donated loop state and
the host hands them out. Chosen over an `io_callback` inside the loop: executables holding host
callbacks are not kept by JAX's persistent compilation cache, and the CLI's streamed run is its
main use (an unrolled layer loop is slow to compile); the extra cost is one dispatch per streamed
token, small against a decode step.

Speculative decoding (`generate(..., draft=...)`, `jaxllama.inference.speculative`) runs its own
on-device loop over the same prefill, first-token step and decode layout: each round checks the
draft's tokens in one cached call of k + 1 tokens and rolls the caches back through each kind's
`Rollback` (mixers/spec.py).

Defaults per platform (`engine_defaults`, a pure function of the platform name, tested for each).
On GPU and TPU both phases compute in the parameter dtype, the cache is in that compute dtype and
decode uses the params in place (stacked, scanned: no copy of the weights). On CPU decode is bound
by reading the weights once per token with matrix-vector products, which XLA:CPU runs far slower in
bfloat16 than in float32, and it reads per-layer buffers faster than slices of stacked ones; so CPU
decodes in float32 from an unstacked float32 copy of the weights (`DecodeLayout`, with the tied head
transposed) over a float32 cache. bfloat16 parameters then still halve the memory of the stored
(prefill) weights. CPU prefill computes in float32, except bfloat16 parameters on a CPU with
bfloat16 matrix units (AVX512_BF16 / AMX, see `cpu_has_bfloat16_units`), where bfloat16 products
with float32 accumulation are faster; without such units XLA:CPU upcasts them anyway. The measured
figures behind each choice are in BENCHMARKS.md (`scripts/bench_cpu_prefill.py`,
`scripts/bench_generate.py`).

Prefill writes the stacked model cache; the call that starts the decode loop takes it donated.
Where the decode layout keeps it stacked, the loop state holds those very buffers (aliased, no
copy). On CPU that call slices it into per-layer caches, so both exist for the duration of that one
call, and the stacked buffers, which XLA cannot alias to differently shaped outputs, are freed
right after it (`free_donated`): the decode loop never holds two caches.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllama.config import ModelConfig
from jaxllama.inference.decode import DecodeLayout, decode_caches, decode_weights
from jaxllama.inference.sampling import SamplingConfig, sample
from jaxllama.layers.basic import dtype_of
from jaxllama.mixers import spec_of
from jaxllama.model import Transformer, init_cache

UNBOUNDED = 2**31 - 1  # context of an all-lambda model without max_len (int32 positions)

CACHE_ROUND = 128


def cpu_has_bfloat16_units() -> bool:
    """True when the host CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX-BF16 in
    /proc/cpuinfo), with which XLA:CPU's bfloat16 matrix products (float32 accumulation) run faster
    than its float32 ones (BENCHMARKS.md); False elsewhere, or when it cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def free_donated(tree) -> None:
    """Free the buffers of a donated argument that XLA could not alias to an output (a stacked
    cache re-laid per layer): JAX keeps those alive while Python holds them."""
    for a in jax.tree.leaves(tree):
        if not a.is_deleted():
            a.delete()


def prefill_chunk_for(cfg: ModelConfig, longest: int, default: int) -> int:
    """The prefill chunk for prompts of at most `longest` tokens: `default`, unless a mixer asks
    for its own (`MixerSpec.prefill_chunk`; FoT takes a prompt whole and unpadded)."""
    asks = [s.prefill_chunk(s.config(cfg), longest) for s in
            map(spec_of, dict.fromkeys(cfg.layer_pattern)) if s.prefill_chunk]
    return min(asks, default=default)


@dataclass(frozen=True)
class EngineDefaults:
    """What an `Engine` uses when not told otherwise (see the module docstring)."""

    prefill_dtype: str
    decode_dtype: str
    cache_dtype: str
    layout: DecodeLayout
    fused_decode: bool = False  # decode from fused q/k/v and gate/up kernels (inference/decode.py)


def engine_defaults(platform: str, param_dtype: str, cpu_has_bf16: bool) -> EngineDefaults:
    """Defaults for `platform` (`jax.default_backend()`: "cpu", "gpu", "cuda", "rocm", "tpu"):
    CPU decodes in float32 from an unstacked copy with a float32 cache (bfloat16 prefill only for
    bfloat16 params with `cpu_has_bf16` units); every other platform computes in `param_dtype`,
    caches in it and decodes from the params in place."""
    if platform.lower() != "cpu":
        return EngineDefaults(param_dtype, param_dtype, param_dtype, DecodeLayout())
    prefill = "bfloat16" if param_dtype == "bfloat16" and cpu_has_bf16 else "float32"
    return EngineDefaults(prefill, "float32", "float32",
                          DecodeLayout(unstacked=True, separate_head=True), fused_decode=True)


class GenerationError(ValueError):
    """Bad generation input (empty or too long prompt, bad length); one line naming it."""


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def prompt_bucket(n: int, chunk: int, min_bucket: int = 16) -> int:
    """Padded prompt length: the next power of two (>= min_bucket) up to `chunk`, then multiples
    of `chunk`."""
    if n > chunk:
        return round_up(n, chunk)
    return min(chunk, max(min_bucket, 1 << max(n - 1, 0).bit_length()))


@dataclass
class GenerationOutput:
    """Result of `Engine.generate` for a batch of B prompts."""

    tokens: np.ndarray  # [B n] int32: generated ids; `pad_id` after a row stopped
    lengths: np.ndarray  # [B] tokens generated per row (a final EOS included)
    stopped: np.ndarray  # [B] bool: the row ended with an EOS id
    prompt_lengths: np.ndarray  # [B]
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    draft_rounds: int = 0  # speculative decoding: verification rounds run
    draft_accepted: int = 0  # draft tokens kept over those rounds
    draft_tokens: int = 0  # draft tokens proposed per round (0: no draft)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the proposed draft tokens that were kept (nan without a draft)."""
        proposed = self.draft_rounds * self.draft_tokens
        return self.draft_accepted / proposed if proposed else float("nan")

    def row(self, b: int) -> list[int]:
        """Generated ids of row b (a final EOS included, padding excluded)."""
        return self.tokens[b, : self.lengths[b]].tolist()

    @property
    def steps(self) -> int:
        return int(self.lengths.max(initial=0))

    @property
    def prefill_tokens_per_s(self) -> float:
        return float(self.prompt_lengths.sum()) / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per sequence over the decode loop (the first token comes from the
        prefill logits, so a loop of `steps` tokens runs `steps - 1` forward passes)."""
        return max(self.steps - 1, 0) / max(self.decode_seconds, 1e-9)


@struct.dataclass
class DecodeState:
    """What the decode loop carries: tokens written so far into `out` [B n] (step = next column),
    the last token and next position per row, the caches, and which rows are done."""

    step: jax.Array
    tok: jax.Array  # [B]
    positions: jax.Array  # [B]
    caches: Any
    done: jax.Array  # [B] bool
    out: jax.Array  # [B n] int32


class Engine:
    """Prefill + decode for one model and one set of parameters (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, params, *, prefill_dtype: str | None = None,
                 decode_dtype: str | None = None, cache_dtype: str | None = None,
                 unstacked: bool | None = None, separate_head: bool | None = None,
                 fused: bool | None = None, prefill_chunk: int = 2048, min_bucket: int = 16,
                 stream_every: int = 1, platform: str | None = None):
        """Unset options take `engine_defaults(platform)` (default: `jax.default_backend()`);
        `unstacked` / `separate_head` choose the `DecodeLayout`; `fused` decodes from fused
        q/k/v and gate/up kernels (default: on CPU, where the layout copies the weights anyway,
        `inference/decode.py`). On CPU a config
        naming the `xla` attention runs `auto` instead (both pure XLA: `auto` picks the masked
        products where they measured faster, kernels/flash_attention/heuristics.py)."""
        platform = platform or jax.default_backend()
        on_cpu = platform.lower() == "cpu"
        d = engine_defaults(platform, cfg.param_dtype, on_cpu and cpu_has_bfloat16_units())
        self.cfg = cfg
        self.params = params
        self.prefill_cfg = cfg.replace(dtype=prefill_dtype or d.prefill_dtype)
        self.decode_cfg = cfg.replace(dtype=decode_dtype or d.decode_dtype)
        # the cache follows an explicit decode dtype where the default is the compute dtype
        self.cache_dtype = dtype_of(cache_dtype or (d.cache_dtype if on_cpu
                                                    else self.decode_cfg.dtype))
        unstacked = d.layout.unstacked if unstacked is None else unstacked
        separate_head = d.layout.separate_head if separate_head is None else separate_head
        self.layout = DecodeLayout(unstacked=unstacked, separate_head=separate_head)
        # by default only where the layout copies the weights anyway
        self.fused = d.fused_decode and (unstacked or separate_head) if fused is None else fused
        if on_cpu and cfg.kernels.attention == "xla":
            auto = dataclasses.replace(cfg.kernels, attention="auto")
            self.prefill_cfg = self.prefill_cfg.replace(kernels=auto)
            self.decode_cfg = self.decode_cfg.replace(kernels=auto)
        self.prefill_chunk = prefill_chunk
        self.min_bucket = min_bucket
        self.stream_every = stream_every
        self._weights: dict | None = None
        self._compiled: dict = {}
        self._prefill_fn = jax.jit(self._prefill, donate_argnums=(4,))
        sampling = ("greedy", "top_k", "use_top_p")
        # the stacked cache is donated into `_first`: freed once the decode caches exist (aliased
        # when the layout keeps it stacked)
        self._first_fn = jax.jit(self._first, donate_argnums=(0,),
                                 static_argnames=(*sampling, "out_len"))
        self._chunk_fn = jax.jit(self._chunk, donate_argnums=(1,), static_argnames=sampling)
        self._init_cache_fn = jax.jit(partial(init_cache, cfg, dtype=self.cache_dtype),
                                      static_argnums=(0, 1))

    # ------------------------------------------------------------------------ jitted pieces

    def _prefill(self, params, tokens, positions, segment_ids, cache):
        """[B C] chunk -> (float32 logits of the last column [B V], cache)."""
        model = Transformer(self.prefill_cfg)
        h, cache = model.apply({"params": params}, tokens, positions, cache, segment_ids,
                               method=Transformer.hidden)
        logits = model.apply({"params": params}, h[:, -1:], method=Transformer.logits)
        return logits[:, 0], cache

    def _first(self, cache, logits, positions, key, temperature, top_p, eos, pad_id, *,
               greedy, top_k, use_top_p, out_len):
        """Sample every row's first token from the prefill `logits` [B V] and set up the loop
        state (per-layer caches when unstacked). positions [B]: each row's prompt length."""
        cache = decode_caches(self.decode_cfg, cache, self.layout)
        tok = sample(logits, jax.random.fold_in(key, 0), temperature, top_p, greedy=greedy,
                     top_k=top_k, use_top_p=use_top_p)
        out = jnp.full((tok.shape[0], out_len), pad_id, jnp.int32).at[:, 0].set(tok)
        return DecodeState(step=jnp.ones((), jnp.int32), tok=tok, positions=positions,
                           caches=cache, done=jnp.isin(tok, eos), out=out)

    def _chunk(self, weights, state, limit, key, temperature, top_p, eos, pad_id, *, greedy,
               top_k, use_top_p):
        """Run the on-device loop until step `limit` (a traced bound: one executable serves a
        whole generation or a few streamed tokens) or until every row is done."""
        model = self.layout.model(self.decode_cfg)

        def cond(s: DecodeState):
            return (s.step < limit) & ~jnp.all(s.done)

        def body(s: DecodeState):
            # new tokens get segment id 1: padding only ever comes from the prompt
            tok = s.tok[:, None]
            logits, caches = model.apply({"params": weights}, tok, s.positions[:, None],
                                         s.caches, jnp.ones(tok.shape, jnp.int32))
            new = sample(logits[:, 0], jax.random.fold_in(key, s.step), temperature, top_p,
                         greedy=greedy, top_k=top_k, use_top_p=use_top_p)
            new = jnp.where(s.done, pad_id, new)  # finished rows emit the pad id
            out = jax.lax.dynamic_update_slice(s.out, new[:, None], (0, s.step))
            return DecodeState(step=s.step + 1, tok=new, positions=s.positions + 1,
                               caches=caches, done=s.done | jnp.isin(new, eos), out=out)

        return jax.lax.while_loop(cond, body, state)

    # ------------------------------------------------------------------------ host side

    def _stream(self, chunk, weights, state, new, knobs, eos_ids, on_token):
        """Decode `stream_every` tokens per dispatch, calling `on_token(step, tokens [B],
        active [B])` for each step (`active`: the row had not stopped before this token)."""
        eos = np.asarray(list(eos_ids), np.int32)
        active = np.ones(state.tok.shape, bool)
        sent = 0
        while True:
            step = min(int(state.step), new)  # a speculative round may run past `new`
            out = np.array(state.out)[:, sent:step]  # a host copy: `state` is donated next
            for j in range(out.shape[1]):
                on_token(sent + j, out[:, j], active.copy())
                active &= ~np.isin(out[:, j], eos)
            sent = step
            if step >= new or not active.any():
                return state
            state = chunk(weights, state, jnp.int32(min(step + self.stream_every, new)), *knobs)

    def decode_weights(self) -> dict:
        """The params in the decode layout and dtype (built once, on first use; the params
        themselves when the layout is stacked and the dtype theirs)."""
        if self._weights is None:
            self._weights = decode_weights(self.cfg, self.params, dtype_of(self.decode_cfg.dtype),
                                           self.layout, fused=self.fused)
        return self._weights

    def context_length(self, max_len: int | None = None) -> int:
        """Prompt + generated tokens a sequence may hold: the model's `max_position_embeddings`
        capped by `max_len`. A model none of whose mixers is `context_limited` (lambda layers
        only: G + L keys at distances clipped to D, whatever the position, as in LM-Infinite) has
        no such limit, so there only `max_len` caps it."""
        if not any(spec_of(kind).context_limited for kind in set(self.cfg.layer_pattern)):
            return UNBOUNDED if max_len is None else max_len
        ctx = self.cfg.max_position_embeddings
        return ctx if max_len is None else min(ctx, max_len)

    def chunk_for(self, longest: int) -> int:
        """The prefill chunk for prompts of at most `longest` tokens (`prefill_chunk_for`)."""
        return prefill_chunk_for(self.cfg, longest, self.prefill_chunk)

    def _executable(self, name, fn, args, static=None):
        """`fn` compiled ahead of time for these argument shapes (arrays or ShapeDtypeStructs)
        and static arguments, so that timings never include compilation."""
        static = static or {}
        leaves = jax.tree.leaves(args)
        key = (name, tuple((x.shape, x.dtype) for x in leaves), tuple(sorted(static.items())))
        compiled = self._compiled.get(key)
        if compiled is None:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                # a donated stacked cache re-laid per layer cannot be aliased; it is still freed
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                compiled = fn.lower(*args, **static).compile()
            self._compiled[key] = compiled
            self._compile_seconds += time.perf_counter() - t0
        return compiled

    def prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                max_len: int | None = None):
        """Validate and left-pad: (tokens, positions, segment_ids [B bucket], lengths [B],
        new tokens, cache slots)."""
        if not prompts:
            raise GenerationError("no prompts given")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() == 0:
            raise GenerationError(f"prompt {int(np.argmin(lengths))} is empty")
        longest, context = int(lengths.max()), self.context_length(max_len)
        if longest >= context:
            raise GenerationError(f"prompt has {longest} tokens but the context holds {context} "
                                  "(no room to generate)")
        new = min(max_new_tokens, context - longest)
        bucket = prompt_bucket(longest, self.chunk_for(longest), self.min_bucket)
        slots = round_up(bucket + new, CACHE_ROUND)
        b = len(prompts)
        tokens = np.zeros((b, bucket), np.int32)
        positions = np.zeros((b, bucket), np.int32)
        segment_ids = np.zeros((b, bucket), np.int32)
        for i, p in enumerate(prompts):
            n = len(p)
            tokens[i, bucket - n:] = np.asarray(p, np.int32)
            positions[i, bucket - n:] = np.arange(n)
            segment_ids[i, bucket - n:] = 1
        return tokens, positions, segment_ids, lengths, new, slots

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
                 sampling: SamplingConfig | None = None, seed: int = 0,
                 eos_ids: Sequence[int] = (), pad_id: int = 0, max_len: int | None = None,
                 on_token: Callable | None = None, draft=None) -> GenerationOutput:
        """Generate up to `max_new_tokens` per prompt (token id lists), stopping a row at any of
        `eos_ids`. `on_token(step, tokens [B], active [B])` is called for every step as soon as
        it is sampled (`active` is False for rows that had already stopped). `draft` (an
        `NgramDraft` or `ModelDraft`) decodes speculatively: the same tokens when greedy, the
        same distribution when sampling (`jaxllama.inference.speculative`)."""
        sampling = SamplingConfig() if sampling is None else sampling
        if draft is not None:
            from jaxllama.inference import speculative

            return speculative.generate(self, draft, prompts, max_new_tokens, sampling, seed,
                                        eos_ids, pad_id, max_len, on_token)
        tokens, positions, segment_ids, lengths, new, slots = self.prepare(
            prompts, max_new_tokens, max_len)
        b, bucket = tokens.shape
        chunk = min(bucket, self.chunk_for(int(lengths.max())))
        self._compile_seconds = 0.0
        cache = self._init_cache_fn(b, slots)
        chunks = [tuple(jnp.asarray(a[:, c:c + chunk]) for a in (tokens, positions, segment_ids))
                  for c in range(0, bucket, chunk)]
        prefill = self._executable("prefill", self._prefill_fn, (self.params, *chunks[0], cache))
        greedy, top_k, use_top_p = sampling.static(self.cfg.vocab_size)
        static = {"greedy": greedy, "top_k": top_k, "use_top_p": use_top_p}
        knobs = (jax.random.key(seed), *sampling.dynamic(),
                 jnp.asarray(list(eos_ids) or [-1], jnp.int32), jnp.asarray(pad_id, jnp.int32))
        logits = jax.ShapeDtypeStruct((b, self.cfg.vocab_size), jnp.float32)
        first = self._executable("first", self._first_fn,
                                 (cache, logits, jnp.asarray(lengths), *knobs),
                                 {**static, "out_len": slots - bucket + 1})
        state = jax.eval_shape(partial(self._first, **static, out_len=slots - bucket + 1),
                               cache, logits, jnp.asarray(lengths), *knobs)
        weights = self.decode_weights()
        chunk = self._executable("chunk", self._chunk_fn,
                                 (weights, state, jnp.int32(0), *knobs), static)

        t0 = time.perf_counter()
        for part in chunks:
            logits, cache = prefill(self.params, *part, cache)
        logits.block_until_ready()
        prefill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        state = first(cache, logits, jnp.asarray(lengths), *knobs)
        free_donated(cache)
        if on_token is None:
            state = chunk(weights, state, jnp.int32(new), *knobs)
        else:  # a few tokens per dispatch, each handed to `on_token` as soon as it is back
            state = self._stream(chunk, weights, state, new, knobs, eos_ids, on_token)
        out, steps, done = np.asarray(state.out), int(state.step), np.asarray(state.done)
        decode_s = time.perf_counter() - t0
        out = out[:, :steps]
        is_eos = np.isin(out, np.asarray(list(eos_ids), np.int32))
        first_eos = np.where(is_eos.any(1), is_eos.argmax(1) + 1, steps)
        return GenerationOutput(tokens=out, lengths=first_eos.astype(np.int32), stopped=done,
                                prompt_lengths=lengths, prefill_seconds=prefill_s,
                                decode_seconds=decode_s, compile_seconds=self._compile_seconds)


__all__ = ["Engine", "EngineDefaults", "GenerationError", "GenerationOutput", "engine_defaults",
           "prompt_bucket"]
