"""Decode tokens/s of SmolLM2-135M-Instruct at long context: dense vs lambda layers.

    python scripts/bench_long_decode.py --contexts 2048,32768 --steps 64

For each model and context N, a cache that holds N tokens is built, then `--steps` greedy decode
steps run in one jitted on-device loop (the per-layer unrolled decode of `jaxllama.inference`,
float32), timed after a warm-up run. Decode speed does not depend on what the cache holds, so the
cache is filled with random keys/values and marked as holding N tokens instead of being prefilled
(a real 32K dense prefill costs many minutes on a CPU; `scripts/eval_long_context.py` does real
32K prefills and decodes). A dense layer reads all N cached positions per token, a lambda layer
G + L whatever N: dense decode slows down with context, lambda should not.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from jaxllama.checkpoint import load_checkpoint
from jaxllama.checkpoint.base import relayout, with_overrides
from jaxllama.inference.decode import DecodeLayout, decode_weights
from jaxllama.kvcache import plan
from jaxllama.mixers.attention import KVCache
from jaxllama.mixers.lambda_attention import LambdaCache
from jaxllama.model import init_cache

LAYOUT = DecodeLayout(unstacked=True, separate_head=True)  # the engine's CPU decode layout


def filled_cache(cfg, n: int, seed: int):
    """Per-layer caches holding n tokens of random keys/values (scale of real ones: ~unit)."""
    caches = init_cache(cfg, 1, n + 1024, dtype=jnp.float32, unstacked=True)
    key = jax.random.key(seed)
    out = []
    for i, c in enumerate(caches):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))

        def rand(a, k):
            return jax.random.normal(k, a.shape, a.dtype)

        if isinstance(c, KVCache):
            seg = (jnp.arange(c.segment_ids.shape[1]) < n).astype(jnp.int32)[None]
            c = c.replace(k=rand(c.k, k1), v=rand(c.v, k2), segment_ids=seg,
                          length=jnp.asarray(n, jnp.int32))
        elif isinstance(c, LambdaCache):
            c = c.replace(sink_k=rand(c.sink_k, k1), sink_v=rand(c.sink_v, k2),
                          sink_segment_ids=jnp.ones_like(c.sink_segment_ids),
                          ring_k=rand(c.ring_k, k1), ring_v=rand(c.ring_v, k2),
                          ring_segment_ids=jnp.ones_like(c.ring_segment_ids),
                          first_slot=jnp.zeros_like(c.first_slot),
                          length=jnp.asarray(n, jnp.int32))
        else:
            raise TypeError(f"no filler for {type(c).__name__}")
        out.append(c)
    return tuple(out)


def decode_loop(cfg, steps: int):
    """jit: (weights, caches, first token, start position) -> tokens [steps], greedy."""

    model = LAYOUT.model(cfg)

    def run(weights, caches, tok, pos):
        def body(i, state):
            tok, caches, out = state
            logits, caches = model.apply({"params": weights}, tok[None, None],
                                         (pos + i)[None, None], caches)
            new = jnp.argmax(logits[0, 0]).astype(jnp.int32)
            return new, caches, out.at[i].set(new)

        state = (tok, caches, jnp.zeros((steps,), jnp.int32))
        return jax.lax.fori_loop(0, steps, body, state)[2]

    return jax.jit(run)


def bench(cfg, params, n: int, steps: int, repeats: int) -> tuple[float, float]:
    """(tokens/s, seconds to compile + warm up)."""
    weights = decode_weights(cfg, params, jnp.float32, LAYOUT)
    caches = filled_cache(cfg, n, seed=n)
    fn = decode_loop(cfg, steps)
    tok, pos = jnp.asarray(1, jnp.int32), jnp.asarray(n, jnp.int32)
    t0 = time.perf_counter()
    fn(weights, caches, tok, pos).block_until_ready()
    warm = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(weights, caches, tok, pos).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return steps / best, warm


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
    ap = _Parser(prog="scripts/bench_long_decode.py", description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=_ints, default=[2048, 32768])
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (the best is reported)")
    ap.add_argument("--window", type=int, default=2048, help="lambda window L (= distance D)")
    ap.add_argument("--global-tokens", type=int, default=100, help="lambda sink tokens G")
    args = ap.parse_args(argv)
    if args.steps <= 0 or args.repeats <= 0:
        ap.error("--steps and --repeats must be > 0")
    ck = load_checkpoint(None)
    lam = with_overrides(ck.config, ["model.layer_pattern=lambda",
                                     f"model.lambda.global_tokens={args.global_tokens}",
                                     f"model.lambda.window={args.window}",
                                     f"model.lambda.distance={args.window}"])
    models = {"dense": (ck.config, ck.params),
              f"lambda G={args.global_tokens} L={args.window}":
                  (lam, relayout(ck.params, ck.config, lam))}
    print(f"SmolLM2-135M-Instruct decode, batch 1, float32, {args.steps} steps per run, "
          f"best of {args.repeats}; JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| model | context | decode tok/s | cache (keys/values) |")
    print("|---|---:|---:|---:|")
    speed = {}
    for name, (cfg, params) in models.items():
        for n in args.contexts:
            tps, _ = bench(cfg, params, n, args.steps, args.repeats)
            speed[name, n] = tps
            mb = plan(cfg, n + 1024, dtype="float32").kv_bytes / 1e6
            print(f"| {name} | {n:,} | {tps:.1f} | {mb:,.0f} MB |", flush=True)
    lo, hi = min(args.contexts), max(args.contexts)
    if lo != hi:
        print()
        for name in models:
            print(f"{name}: tok/s at {hi:,} / tok/s at {lo:,} = "
                  f"{speed[name, hi] / speed[name, lo]:.2f}")
        lam_name = next(n for n in models if n != "dense")
        print(f"lambda / dense tok/s at {hi:,} = {speed[lam_name, hi] / speed['dense', hi]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
