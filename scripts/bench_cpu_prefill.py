"""Where SmolLM2's 2048-token prefill spends its time on a CPU, and what XLA:CPU's products reach.

    python scripts/bench_cpu_prefill.py

1. Matrix products [2048 576] x [576 1536] (a prefill projection): float32, bfloat16 in and out,
   bfloat16 in with float32 accumulation (what `Linear` does); GFLOP/s.
2. Matrix-vector product [1 576] x [576 49152] (the decode LM head): float32 vs bfloat16, GB/s read.
3. One layer's causal attention, T = 2048, 9 query / 3 kv heads of 64, bfloat16: ours (blockwise
   reference, what the model runs on CPU) at several block sizes vs `jax.nn.dot_product_attention`
   (XLA), with the ratio.
4. The whole model's 2048-token forward (final hidden states, no LM head): bfloat16 compute without
   a cache, through a float32 and a bfloat16 KV cache, and float32 compute; tokens/s.
Best of `--repeats` after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jaxllama.kernels.flash_attention.api import attend
from jaxllama.kernels.flash_attention.mask import Mask


def best_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out = min(out, time.perf_counter() - t0)
    return out


def products(repeats: int) -> None:
    m, k, n = 2048, 576, 1536
    flops = 2 * m * k * n
    rates = {}
    for name, dt, acc in [("float32", jnp.float32, None),
                          ("bfloat16 -> bfloat16", jnp.bfloat16, None),
                          ("bfloat16, float32 accumulation", jnp.bfloat16, jnp.float32)]:
        x, w = jnp.ones((m, k), dt), jnp.ones((k, n), dt)
        fn = jax.jit(lambda x, w, acc=acc: jnp.dot(x, w, preferred_element_type=acc))
        rates[name] = flops / best_seconds(fn, x, w, repeats=repeats) / 1e9
        print(f"| matmul [{m} {k}] x [{k} {n}] | {name} | {rates[name]:.0f} GFLOP/s |")
    print(f"bfloat16 with float32 accumulation / float32 = "
          f"{rates['bfloat16, float32 accumulation'] / rates['float32']:.2f}")
    read = {}
    for name, dt in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]:
        x, w = jnp.ones((1, k), dt), jnp.ones((k, 49152), dt)
        s = best_seconds(jax.jit(jnp.dot), x, w, repeats=repeats)
        read[name] = w.size * w.dtype.itemsize / s / 1e9
        print(f"| matvec [1 {k}] x [{k} 49152] | {name} | {read[name]:.1f} GB/s |")
    print(f"float32 / bfloat16 matvec read rate = {read['float32'] / read['bfloat16']:.1f}")


def attention(repeats: int) -> None:
    t, n, kv, h = 2048, 9, 3, 64
    q = jax.random.normal(jax.random.key(0), (1, t, n, h), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (1, t, kv, h), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), (1, t, kv, h), jnp.bfloat16)
    visible_flops = 4 * h * n * t * (t + 1) / 2
    ours = {}
    for bs in [None, (128, 128), (256, 256), (512, 512), (2048, 2048)]:
        fn = jax.jit(lambda q, k, v, bs=bs: attend(q, k, v, Mask(causal=True), block_sizes=bs,
                                                   implementation="xla"))
        ours[bs] = best_seconds(fn, q, k, v, repeats=repeats)
        print(f"| attention T {t}, ours, blocks {bs or 'default'} | {ours[bs] * 1e3:.1f} ms | "
              f"{visible_flops / ours[bs] / 1e9:.0f} GFLOP/s visible |")
    g = n // kv
    peer = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), is_causal=True,
        implementation="xla"))
    s = best_seconds(peer, q, k, v, repeats=repeats)
    print(f"| attention T {t}, jax.nn.dot_product_attention (xla) | {s * 1e3:.1f} ms | |")
    print(f"ours (default blocks) / jax.nn time = {ours[None] / s:.2f}; x30 layers: "
          f"{ours[None] * 30:.2f} s per 2048-token prefill")


def model_forward(repeats: int) -> None:
    from jaxllama.api import from_pretrained
    from jaxllama.model import Transformer, init_cache

    llm = from_pretrained(None, "bfloat16")
    ids = jnp.asarray(np.random.default_rng(0).integers(100, 40000, (1, 2048)), jnp.int32)
    pos = jnp.arange(2048, dtype=jnp.int32)[None]
    for compute, cache_dtype in [("bfloat16", None), ("bfloat16", jnp.float32),
                                 ("bfloat16", jnp.bfloat16), ("float32", None)]:
        model = Transformer(llm.config.replace(dtype=compute))
        if cache_dtype is None:
            fn = jax.jit(lambda p, t, q, m=model: m.apply({"params": p}, t, q,
                                                          method=Transformer.hidden)[0])
            args = (llm.params, ids, pos)
        else:
            cache = init_cache(model.cfg, 1, 2048 + 128, dtype=cache_dtype)
            fn = jax.jit(lambda p, t, q, c, m=model: m.apply(
                {"params": p}, t, q, c, jnp.ones_like(t), method=Transformer.hidden)[0])
            args = (llm.params, ids, pos, cache)
        s = best_seconds(fn, *args, repeats=repeats)
        where = "no cache" if cache_dtype is None else f"{jnp.dtype(cache_dtype).name} cache"
        print(f"| SmolLM2 forward, 2048 tokens | {compute} compute, {where} | "
              f"{2048 / s:.0f} tok/s ({s:.2f} s) |", flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    ap = _Parser(prog="scripts/bench_cpu_prefill.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.repeats <= 0:
        ap.error("--repeats must be > 0")
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    products(args.repeats)
    attention(args.repeats)
    model_forward(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
