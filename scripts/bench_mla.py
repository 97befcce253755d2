"""MLA against dense GQA at SmolLM2-135M's size: one-token decode speed and cache bytes.

    python scripts/bench_mla.py                    # 2K, 8K, 32K of context (minutes on a CPU)
    python scripts/bench_mla.py --tiny             # a tiny model at 64 / 128 slots (seconds)

Random weights (speed does not depend on them). Three models of the same width, depth, MLP and
vocabulary: SmolLM2-135M's dense GQA (9 query / 3 kv heads of 64), and MLA layers with
Zebra-Llama-1B-like latent dims (kv_lora 128, nope / rope 32 / 32, values 64, q_lora 384) decoded
in the absorbed form (attention in latent space over the cache) and in the expanded form (keys
and values re-expanded from the whole latent cache every step). The cache is filled with random
values up to `context - 1` slots and one token is decoded at a time, batch 1, through the
engine's decode layout (`decode_weights`: unstacked on CPU, absorbed weights prepared once);
tokens/s is the median over `--steps` timed steps after one warm-up step. Cache bytes are the
planner's (`jaxllama.kvcache.plan`, keys/values only) in the cache dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxllama.config import AttentionConfig, MLAConfig, ModelConfig, RopeConfig
from jaxllama.inference.decode import DecodeLayout, decode_weights
from jaxllama.kvcache import plan
from jaxllama.model import init_cache, init_params

SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
           "max_position_embeddings": 32768, "tie_word_embeddings": True,
           "attention": AttentionConfig(num_heads=9, num_kv_heads=3, head_dim=64,
                                        rope=RopeConfig(theta=100000.0))}
MLA = MLAConfig(num_heads=9, q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=32,
                qk_rope_head_dim=32, v_head_dim=64, rope=RopeConfig(theta=100000.0))
TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "max_position_embeddings": 256, "tie_word_embeddings": True,
        "attention": AttentionConfig(num_heads=4, num_kv_heads=2)}
TINY_MLA = MLAConfig(num_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=16)


def models(tiny: bool, layers: int) -> dict[str, ModelConfig]:
    base, mla = (TINY, TINY_MLA) if tiny else (SMOLLM2, MLA)
    return {
        "dense GQA": ModelConfig(layer_pattern=("dense",) * layers, **base),
        "MLA absorbed": ModelConfig(layer_pattern=("mla",) * layers, mla=mla, **base),
        "MLA expanded": ModelConfig(layer_pattern=("mla",) * layers,
                                    mla=dataclasses.replace(mla, decode="expanded"), **base),
    }


def filled_cache(cfg: ModelConfig, context: int, layout: DecodeLayout, dtype):
    """A decode cache of `context` slots holding `context - 1` random entries."""
    cache = init_cache(cfg, 1, context, dtype, unstacked=layout.unstacked)
    leaves, tree = jax.tree.flatten(cache)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    out = []
    for k, a in zip(keys, leaves, strict=True):
        if jnp.issubdtype(a.dtype, jnp.floating):
            out.append(jax.random.normal(k, a.shape, a.dtype))
        elif a.ndim == 0:  # the slot count
            out.append(jnp.full((), context - 1, a.dtype))
        else:  # segment ids [.. B S]: written slots are segment 1
            out.append((jnp.arange(a.shape[-1]) < context - 1).astype(a.dtype)
                       * jnp.ones(a.shape, a.dtype))
    return jax.tree.unflatten(tree, out)


def bench(cfg: ModelConfig, context: int, steps: int) -> float:
    """Median seconds of one decode step at `context - 1` cached tokens."""
    layout = DecodeLayout(unstacked=True)
    params = init_params(cfg, jax.random.key(1))
    weights = decode_weights(cfg, params, jnp.float32, layout)
    del params
    cache = filled_cache(cfg, context, layout, jnp.float32)
    model = layout.model(cfg)
    step = jax.jit(lambda w, tok, pos, c: model.apply({"params": w}, tok, pos, c),
                   donate_argnums=(3,))
    tok = jnp.zeros((1, 1), jnp.int32)
    pos = jnp.full((1, 1), context - 1, jnp.int32)

    def one(cache):
        # rewind the slot count so every timed step reads the same context
        cache = jax.tree.map(lambda a: jnp.full((), context - 1, a.dtype) if a.ndim == 0 else a,
                             cache)
        t0 = time.perf_counter()
        logits, cache = step(weights, tok, pos, cache)
        logits.block_until_ready()
        return time.perf_counter() - t0, cache

    _, cache = one(cache)  # compile + warm-up
    times = []
    for _ in range(steps):
        dt, cache = one(cache)
        times.append(dt)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model at 64 / 128 slots")
    ap.add_argument("--contexts", type=int, nargs="+", default=None,
                    help="cache slots (default 2048 8192 32768; --tiny: 64 128)")
    ap.add_argument("--layers", type=int, default=None, help="default 30 (--tiny: 2)")
    ap.add_argument("--steps", type=int, default=5, help="timed decode steps per row")
    ap.add_argument("--only", nargs="+", default=None, help="model names to run (default all)")
    args = ap.parse_args(argv)
    contexts = args.contexts or ([64, 128] if args.tiny else [2048, 8192, 32768])
    layers = args.layers or (2 if args.tiny else 30)
    if any(c < 2 for c in contexts) or layers < 1 or args.steps < 1:
        print("bench_mla: --contexts must be >= 2, --layers and --steps >= 1", file=sys.stderr)
        return 2
    cfgs = models(args.tiny, layers)
    if args.only:
        unknown = [n for n in args.only if n not in cfgs]
        if unknown:
            print(f"bench_mla: --only {unknown[0]!r} is not one of {list(cfgs)}",
                  file=sys.stderr)
            return 2
        cfgs = {n: cfgs[n] for n in args.only}
    print(f"{layers} layers, batch 1, float32 weights and cache, {args.steps} timed steps")
    print(f"{'model':<14}{'context':>8}{'cache bytes':>16}{'ms/token':>11}{'tokens/s':>10}")
    for context in contexts:
        for name, cfg in cfgs.items():
            kv = plan(cfg, context, batch=1, dtype="float32").kv_bytes
            sec = bench(cfg, context, args.steps)
            print(f"{name:<14}{context:>8}{kv:>16,}{1e3 * sec:>11.2f}{1 / sec:>10.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
