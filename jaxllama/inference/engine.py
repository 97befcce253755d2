"""Batched generation: a jitted prefill and a jitted on-device decode loop over a preallocated cache.

Shapes and compilation. Prompts are left-padded to a *bucket* (16, 32, 64, ... up to
`prefill_chunk`, then multiples of it) and the cache to `bucket + max_new_tokens` rounded up to 128
slots, so one compiled prefill and one compiled decode loop serve every prompt of a bucket;
nothing recompiles per token or per prompt length. Padding gets segment id 0 (masked for every
real token, see `KVCache`); each row's positions start at 0 at its first real token, so a padded
row computes exactly what it computes alone. Prompts longer than `prefill_chunk` are prefilled
chunk by chunk through the same compiled function (bounded attention memory).

Decode loop. One `lax.while_loop` runs on device: forward one token per row, sample, write the
token into a preallocated [B, n] buffer, mark rows that produced an EOS id (they then emit the pad
id), and stop when every row is done or `max_new_tokens` is reached. Streaming uses an ordered
`io_callback` per step instead of chunked Python loops: the token reaches the host the moment it is
sampled, the loop stays one dispatch, and the callback costs well under a millisecond per step
(a ~15 ms step here); without a listener the callback is not compiled in at all.

Precision per phase (`prefill_dtype`, `decode_dtype`; the KV cache is float32 by default, so a
bfloat16 prefill writes a cache that a float32 decode reads without conversions). On accelerators
both phases default to the parameter dtype. On CPU both default to float32, whatever the parameter
dtype: decode is bound by reading the weights once per token with matrix-vector products, which
XLA:CPU runs about 25x slower in bfloat16 than in float32, so the decode weights are kept as a
float32 copy; and on CPUs without bfloat16 matrix units (AVX2 only, as measured here) XLA:CPU
upcasts bfloat16 matrix products to float32 anyway, so a bfloat16 prefill only adds conversions.
bfloat16 parameters then still halve the memory of the stored (prefill) weights. A CPU with
bfloat16 units can ask for `prefill_dtype="bfloat16"`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxllama.config import ModelConfig
from jaxllama.inference.decode import DecodeWeights, decode_step, decode_weights, stacked_to_layers
from jaxllama.inference.sampling import SamplingConfig, sample
from jaxllama.layers.basic import dtype_of
from jaxllama.model import Transformer, init_cache

CACHE_ROUND = 128


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


class Engine:
    """Prefill + decode for one model and one set of parameters (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, params, *, prefill_dtype: str | None = None,
                 decode_dtype: str | None = None, cache_dtype: str = "float32",
                 unrolled: bool = True, prefill_chunk: int = 2048, min_bucket: int = 16):
        on_cpu = jax.default_backend() == "cpu"
        self.cfg = cfg
        self.params = params
        default = "float32" if on_cpu else cfg.param_dtype
        self.prefill_cfg = cfg.replace(dtype=prefill_dtype or default)
        self.decode_cfg = cfg.replace(dtype=decode_dtype or default)
        self.cache_dtype = dtype_of(cache_dtype)
        self.unrolled = unrolled
        self.prefill_chunk = prefill_chunk
        self.min_bucket = min_bucket
        self._weights: DecodeWeights | None = None
        self._compiled: dict = {}
        self._on_token: Callable | None = None
        self._prefill_fn = jax.jit(self._prefill, donate_argnums=(4,))
        self._decode_fn = jax.jit(
            self._decode,
            static_argnames=("greedy", "top_k", "use_top_p", "stream", "out_len"))
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

    def _decode(self, weights, cache, logits, positions, key, temperature, top_p, max_new, eos,
                pad_id, *, greedy, top_k, use_top_p, stream, out_len):
        """Sample from the prefill `logits` [B V], then loop one token per step on device.

        positions [B]: position of each row's first generated token (its prompt length).
        Returns (tokens [B out_len], steps run, done [B]).
        """
        cfg = self.decode_cfg
        caches = stacked_to_layers(cfg, cache) if weights.stacked is None else cache
        pick = partial(sample, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                       use_top_p=use_top_p)

        def emit(step, tok, active):
            if stream:
                io_callback(self._emit, None, step, tok, active, ordered=True)

        tok = pick(logits, jax.random.fold_in(key, 0))
        done = jnp.isin(tok, eos)
        out = jnp.full((tok.shape[0], out_len), pad_id, jnp.int32).at[:, 0].set(tok)
        emit(0, tok, jnp.ones_like(done))

        def cond(state):
            step, _, _, _, done, _ = state
            return (step < max_new) & ~jnp.all(done)

        def body(state):
            step, tok, pos, caches, done, out = state
            logits, caches = decode_step(cfg, weights, tok[:, None], pos[:, None], caches)
            new = pick(logits[:, 0], jax.random.fold_in(key, step))
            new = jnp.where(done, pad_id, new)
            out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
            emit(step, new, ~done)
            return step + 1, new, pos + 1, caches, done | jnp.isin(new, eos), out

        state = (jnp.ones((), jnp.int32), tok, positions, caches, done, out)
        step, _, _, _, done, out = jax.lax.while_loop(cond, body, state)
        return out, step, done

    def _emit(self, step, tok, active):
        if self._on_token is not None:
            self._on_token(int(step), np.asarray(tok), np.asarray(active))

    # ------------------------------------------------------------------------ host side

    def decode_weights(self) -> DecodeWeights:
        """Weights re-laid for decoding (built once, on first use)."""
        if self._weights is None:
            self._weights = decode_weights(self.cfg, self.params, dtype_of(self.decode_cfg.dtype),
                                           self.unrolled)
        return self._weights

    def context_length(self, max_len: int | None = None) -> int:
        ctx = self.cfg.attention.max_position_embeddings
        return ctx if max_len is None else min(ctx, max_len)

    def _executable(self, name, fn, args, static=None):
        """`fn` compiled ahead of time for these argument shapes (arrays or ShapeDtypeStructs)
        and static arguments, so that timings never include compilation."""
        static = static or {}
        leaves = jax.tree.leaves(args)
        key = (name, tuple((x.shape, x.dtype) for x in leaves), tuple(sorted(static.items())))
        compiled = self._compiled.get(key)
        if compiled is None:
            t0 = time.perf_counter()
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
        bucket = prompt_bucket(longest, self.prefill_chunk, self.min_bucket)
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
                 on_token: Callable | None = None) -> GenerationOutput:
        """Generate up to `max_new_tokens` per prompt (token id lists), stopping a row at any of
        `eos_ids`. `on_token(step, tokens [B], active [B])` is called for every step as soon as
        it is sampled (`active` is False for rows that had already stopped)."""
        sampling = SamplingConfig() if sampling is None else sampling
        tokens, positions, segment_ids, lengths, new, slots = self.prepare(
            prompts, max_new_tokens, max_len)
        b, bucket = tokens.shape
        chunk = min(bucket, self.prefill_chunk)
        self._compile_seconds = 0.0
        cache = self._init_cache_fn(b, slots)
        chunks = [tuple(jnp.asarray(a[:, c:c + chunk]) for a in (tokens, positions, segment_ids))
                  for c in range(0, bucket, chunk)]
        prefill = self._executable("prefill", self._prefill_fn, (self.params, *chunks[0], cache))
        greedy, top_k, use_top_p = sampling.static(self.cfg.vocab_size)
        temperature, top_p = sampling.dynamic()
        eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
        logits = jax.ShapeDtypeStruct((b, self.cfg.vocab_size), jnp.float32)
        args = [self.decode_weights(), cache, logits, jnp.asarray(lengths), jax.random.key(seed),
                temperature, top_p, jnp.asarray(new, jnp.int32), eos,
                jnp.asarray(pad_id, jnp.int32)]
        static = {"greedy": greedy, "top_k": top_k, "use_top_p": use_top_p,
                      "stream": on_token is not None, "out_len": slots - bucket + 1}
        decode = self._executable("decode", self._decode_fn, args, static)

        t0 = time.perf_counter()
        for part in chunks:
            logits, cache = prefill(self.params, *part, cache)
        logits.block_until_ready()
        prefill_s = time.perf_counter() - t0

        args[1], args[2] = cache, logits
        self._on_token = on_token
        try:
            t0 = time.perf_counter()
            out, steps, done = decode(*args)
            out, steps, done = np.asarray(out), int(steps), np.asarray(done)
            decode_s = time.perf_counter() - t0
        finally:
            self._on_token = None
        out = out[:, :steps]
        is_eos = np.isin(out, np.asarray(list(eos_ids), np.int32))
        first_eos = np.where(is_eos.any(1), is_eos.argmax(1) + 1, steps)
        return GenerationOutput(tokens=out, lengths=first_eos.astype(np.int32), stopped=done,
                                prompt_lengths=lengths, prefill_seconds=prefill_s,
                                decode_seconds=decode_s, compile_seconds=self._compile_seconds)


__all__ = ["Engine", "GenerationError", "GenerationOutput", "prompt_bucket"]
