"""Decode tokens/s of a SmolLM2-135M-sized FoT model: exact memory read vs top-k (`fot.mem_top_k`).

    nice -n 10 python scripts/bench_fot_decode.py --memory 8192,32768 --top-k 128,1024

The model is SmolLM2-135M's shape (30 layers, D 576, 9 query / 3 kv heads of 64, V 49152, tied
embeddings) with random weights and LongLLaMA's layer layout: three `fot` memory layers at a
quarter, a half and three quarters of the depth (LongLLaMA Code 7B: 8, 16, 24 of 32; here 7, 15,
22 of 30), `fot_local` elsewhere, a local window W of `--window` tokens and a last context of W/2.

The caches are written directly, not prefilled (a 32K-token windowed prefill of this model costs
many CPU-minutes and decode speed does not depend on what the cache holds): every memory layer's
memory has M + 256 slots of which M hold random keys/values (unit scale, like real ones) and 256
are unwritten (masked; every variant reads them alike), and every layer's local window holds W/2
random entries at absolute positions M .. M + W/2 - 1 (a prompt's tail). `--steps` greedy steps then run in one jitted on-device loop (the engine's CPU decode
layout: per-layer weights, float32), timed after a warm-up run; the variants (exact, each k) are
timed in turn, round after round, so a load change hits them alike; the best round is reported.
Local entries never reach W during the timed steps, so memory stays M.

Check (printed, exit status 1 when it fails): the top-k path with k = M (the unwritten slots make
the top-k code run, rather than the exact read it defers to when k >= the slot count) decodes
the exact read's tokens, with the last step's logits within 1e-4.

Breakdown (`--breakdown`, or `--layer-only` without the model table): one memory layer's read
of one query (local window + memory, the `_read` of `jaxllama.mixers.fot_attention`) exact vs
top-k, and `jax.lax.top_k` alone on that layer's [kv heads, group, 1, M] scores: what top-k adds
on top of the scores both compute; with its own check (top-k read with k = M == exact read). It
compiles one layer, not the 30-layer decode loop, so it is cheap where compiling is slow.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.config import AttentionConfig, FoTConfig, ModelConfig, RopeConfig
from jaxllama.inference.decode import DecodeLayout, decode_weights
from jaxllama.mixers import spec_of
from jaxllama.mixers.fot_attention import FoTCache, _read, fot_pattern
from jaxllama.model import init_cache, init_params

LAYOUT = DecodeLayout(unstacked=True, separate_head=True)  # the engine's CPU decode layout
LAYERS = 30
MEM_LAYERS = tuple(LAYERS * j // 4 for j in (1, 2, 3))  # 7, 15, 22
SPARE = 256  # unwritten memory slots: k = M still runs the top-k code (the check)


def model_config(window: int, mem_dtype: str, top_k: int = 0) -> ModelConfig:
    return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       layer_pattern=fot_pattern(LAYERS, MEM_LAYERS),
                       max_position_embeddings=window,
                       attention=AttentionConfig(num_heads=9, num_kv_heads=3, head_dim=64,
                                                 rope=RopeConfig(theta=100000.0)),
                       fot=FoTConfig(last_context_length=window // 2, mem_dtype=mem_dtype,
                                     mem_top_k=top_k),
                       rms_norm_eps=1e-5, tie_word_embeddings=True)


def filled(c: FoTCache, m_written: int, local: int, key) -> FoTCache:
    """`c` with `local` random local entries (positions after the memory) and, where it has a
    memory, `m_written` random written memory slots."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    rand = lambda a, k: jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype)
    row = lambda a, like: jnp.broadcast_to(a.astype(jnp.int32), like.shape)
    slot = jnp.arange(c.k.shape[1])
    c = c.replace(k=rand(c.k, k1), v=rand(c.v, k2), positions=row(m_written + slot, c.positions),
                  segment_ids=row(slot < local, c.segment_ids),
                  length=jnp.asarray(local, jnp.int32))
    if c.capacity:
        c = c.replace(mem_k=rand(c.mem_k, k3), mem_v=rand(c.mem_v, k4),
                      mem_segment_ids=row(jnp.arange(c.capacity) < m_written, c.mem_segment_ids),
                      mem_length=jnp.asarray(m_written, jnp.int32))
    return c


def caches(cfg: ModelConfig, m_written: int, capacity: int, seed: int) -> tuple:
    """Per-layer caches (the unstacked layout): memories of `capacity` slots, `m_written` of them
    written; local windows half full."""
    empty = init_cache(cfg, 1, capacity, dtype=jnp.float32, unstacked=True)
    key = jax.random.key(seed)
    local = cfg.fot.last_context_length
    return tuple(filled(c, m_written, local, jax.random.fold_in(key, i))
                 for i, c in enumerate(empty))


def decode_loop(cfg: ModelConfig, steps: int):
    """jit: (weights, caches, first token, start position) -> (tokens [steps], last logits)."""
    model = LAYOUT.model(cfg)

    def run(weights, caches, tok, pos):
        def body(i, state):
            tok, caches, out, _ = state
            logits, caches = model.apply({"params": weights}, tok[None, None],
                                         (pos + i)[None, None], caches)
            new = jnp.argmax(logits[0, 0]).astype(jnp.int32)
            return new, caches, out.at[i].set(new), logits[0, 0]

        state = (tok, caches, jnp.zeros((steps,), jnp.int32),
                 jnp.zeros((cfg.vocab_size,), jnp.float32))
        _, _, out, last = jax.lax.fori_loop(0, steps, body, state)
        return out, last

    return jax.jit(run)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def breakdown(args, m: int, variants: list[int], rounds: int) -> tuple[dict[str, float], float]:
    """One memory layer's read of one query (local window + memory of m + SPARE slots, m written),
    per variant, and `lax.top_k` alone on that layer's scores [1 K G 1 M + SPARE], per k:
    milliseconds, best of `rounds` alternating rounds; and the check: max |out difference| of
    the top-k read with k = m against the exact read."""
    local = args.window // 2  # the query is the last local entry written
    pos = jnp.full((1, 1), m + local - 1, jnp.int32)
    seg = jnp.ones((1, 1), jnp.int32)
    at = jnp.asarray(local - 1, jnp.int32)
    fns, outs = {}, {}
    for k in [*variants, m]:
        cfg = spec_of("fot").config(model_config(args.window, args.mem_dtype, k))
        fns[f"read {'exact' if not k else f'top-k {k}'}"] = jax.jit(partial(_read, cfg, "xla"))
    cache = filled(FoTCache.init(cfg, 1, m + SPARE, jnp.float32), m, local, jax.random.key(m))
    a = cfg.attention
    q = jax.random.normal(jax.random.key(1), (1, 1, a.num_heads, cfg.head_dim))
    scores = jax.random.normal(jax.random.key(2), (1, a.num_kv_heads, a.num_heads
                                                   // a.num_kv_heads, 1, m + SPARE))
    inputs = {name: (q, pos, seg, cache, at) for name in fns}
    for k in variants[1:]:
        fns[f"lax.top_k k={k} alone"] = jax.jit(partial(jax.lax.top_k, k=k))
        inputs[f"lax.top_k k={k} alone"] = (scores,)
    for name, fn in fns.items():
        outs[name] = jax.block_until_ready(fn(*inputs[name]))  # compile + warm up
    diff = float(np.abs(np.asarray(outs["read exact"], np.float32)
                        - np.asarray(outs[f"read top-k {m}"], np.float32)).max())
    del fns[f"read top-k {m}"]
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn, *inputs[name]))
    return {name: t * 1e3 for name, t in best.items()}, diff


def decode_table(args, variants: list[int]) -> bool:
    """The model decode table and the k = M check; True when the check passed."""
    base = model_config(args.window, args.mem_dtype)
    params = jax.jit(lambda k: init_params(base, k))(jax.random.key(0))
    weights = decode_weights(base, params, jnp.float32, LAYOUT)
    del params
    name = lambda k: "exact" if not k else f"top-k {k}"
    print(f"FoT decode, SmolLM2-135M shape (random weights), memory layers {MEM_LAYERS} of "
          f"{LAYERS}, W {args.window}, local {args.window // 2} entries, memory {args.mem_dtype}; "
          f"batch 1, float32 compute, {args.steps} steps per run, best of {args.rounds} "
          f"alternating rounds; JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| memory M | read | decode tok/s | vs exact |")
    print("|---:|---|---:|---:|")
    speed, checks = {}, {}
    for m in args.memory:
        fns, first = {}, {}
        # one cache for all variants (mem_top_k changes no cache shape): the same contents
        inputs = (weights, caches(base, m, m + SPARE, seed=m), jnp.asarray(1, jnp.int32),
                  jnp.asarray(m + args.window // 2, jnp.int32))
        for k in [*variants, m]:
            fns[k] = decode_loop(model_config(args.window, args.mem_dtype, k), args.steps)
            first[k] = jax.block_until_ready(fns[k](*inputs))  # compile + warm up
        ids = [np.asarray(first[k][0]) for k in (0, m)]
        diff = float(np.abs(np.asarray(first[0][1]) - np.asarray(first[m][1])).max())
        checks[m] = (bool(np.array_equal(*ids)), diff)
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.rounds):
            for k in variants:
                best[k] = min(best[k], timed(fns[k], *inputs))
        for k in variants:
            speed[m, k] = args.steps / best[k]
            print(f"| {m:,} | {name(k)} | {speed[m, k]:.1f} | "
                  f"{speed[m, k] / speed[m, 0]:.2f} |", flush=True)
        del fns, inputs, first
    print()
    ok = True
    for m, (same, diff) in checks.items():
        good = same and diff <= 1e-4
        ok &= good
        print(f"check M={m:,}: top-k with k = M ({m + SPARE:,} slots, {SPARE} unwritten) vs "
              f"exact: same {args.steps} tokens {'yes' if same else 'NO'}, last logits max "
              f"|diff| {diff:.2e} ({'ok' if good else 'FAIL'})")
    return ok


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    ap = _Parser(prog="scripts/bench_fot_decode.py", description=__doc__.split("\n")[0])
    ap.add_argument("--memory", type=_ints, default=[8192, 32768],
                    help="memory entries M per memory layer")
    ap.add_argument("--top-k", type=_ints, default=[128, 1024], help="k values to time")
    ap.add_argument("--window", type=int, default=2048, help="local window W (even)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (the best is reported)")
    ap.add_argument("--mem-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--breakdown", action="store_true",
                    help="also time one memory layer's read and lax.top_k alone")
    ap.add_argument("--layer-only", action="store_true",
                    help="only the one-layer breakdown (and its check): no model to compile")
    args = ap.parse_args(argv)
    if args.steps <= 0 or args.rounds <= 0:
        ap.error("--steps and --rounds must be > 0")
    if args.window < 4 or args.window % 2 or args.steps > args.window // 2:
        ap.error("--window must be even, >= 4 and >= 2 * --steps (no eviction while timed)")
    if max(args.top_k) >= min(args.memory):
        ap.error(f"every --top-k must be < every --memory (got k {max(args.top_k)}, "
                 f"M {min(args.memory)}): k >= M reads the memory exactly")
    variants = [0, *args.top_k]
    ok = True
    if not args.layer_only:
        ok = decode_table(args, variants)
    if args.breakdown or args.layer_only:
        print()
        print(f"One memory layer (9 query / 3 kv heads of 64, local {args.window // 2} entries), "
              f"one query, memory of M + {SPARE} slots, best of {max(args.rounds, 5)} "
              "alternating rounds:")
        print("| memory M | op | ms | vs exact read |")
        print("|---:|---|---:|---:|")
        for m in args.memory:
            ms, diff = breakdown(args, m, variants, max(args.rounds, 5))
            for what, t in ms.items():
                print(f"| {m:,} | {what} | {t:.3f} | {t / ms['read exact']:.2f} |", flush=True)
            good = diff <= 1e-5
            ok &= good
            print(f"check M={m:,} (one layer): top-k read with k = M vs exact read: max |out "
                  f"diff| {diff:.2e} ({'ok' if good else 'FAIL'})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
