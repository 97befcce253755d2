"""Attention kernel benchmark: this project's `attend` against jax.nn.dot_product_attention (cuDNN
and XLA) and tokamax (when installed), forward and forward+backward, causal / sliding-window /
lambda.

Throughput counts only unmasked work: 2 * (H + U) flops per visible (query, key) pair per head
forward (QK^T and PV; 4 * H when the value head dim U equals H), and 2.5x that backward (the FlashAttention convention), so a window or lambda mask is
not credited for the blocks it skips.

  python scripts/bench_attention.py              # GPU: T 4K, 16K, 64K, bf16, H 128, 32 q / 8 kv
  python scripts/bench_attention.py --seq 1024    # CPU default sizes are reduced (see --help)

On CPU the peers are the blockwise reference (`xla`, what the model runs there) and XLA's dense
dot_product_attention; the table adds each compiled program's peak temporary memory (XLA buffer
assignment). Lambda peers get an explicit boolean mask of the same visible pattern (one query for
both column kinds: equal work, not equal math), skipped where a [T, T] mask is too large.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jaxllama.kernels.flash_attention.api import BEYOND_WINDOW, ExtraColumns, Mask, attend

MASKS = ("causal", "window", "lambda")
EXPLICIT_MASK_LIMIT = 16384  # T above this: no [T, T] mask for the lambda peers


def visible_pairs(kind: str, t: int, window: int, sinks: int) -> int:
    """Visible (query, key) pairs of one head: causal T(T+1)/2; window min(i+1, W) per row;
    lambda adds sink g < G for rows with i - g >= W."""
    i = np.arange(t, dtype=np.int64)
    if kind == "causal":
        return int(t * (t + 1) // 2)
    local = int(np.minimum(i + 1, window).sum())
    if kind == "window":
        return local
    return local + int(np.clip(i - window + 1, 0, sinks).sum())


def lambda_mask(t: int, window: int, sinks: int):
    """[1 1 T T] bool: the lambda pattern (window band plus the first G columns) for explicit-mask
    peers."""
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    ok = (j <= i) & ((i - j < window) | ((j < sinks) & (i - j >= window)))
    return jnp.asarray(ok[None, None])


def runners(kind: str, impl: str, args, t: int):
    """fn(q, k, v) -> out for one (mask, implementation), or None with a reason."""
    w, g = args.window, args.sinks
    if impl.startswith("ours"):
        name = impl.split(":")[1]
        mask = {"causal": Mask(causal=True), "window": Mask(causal=True, window=w),
                "lambda": Mask(causal=True, window=w)}[kind]

        def ours(q, k, v):
            sink = ExtraColumns(k[:, :g], v[:, :g], BEYOND_WINDOW) if kind == "lambda" else None
            return attend(q, k, v, mask, extra=sink, implementation=name)
        return ours, None
    if impl == "tokamax":
        import tokamax
        peer, extra = tokamax.dot_product_attention, {"implementation": "mosaic"}
    else:
        peer, extra = jax.nn.dot_product_attention, {"implementation": impl.split(":")[1]}
    if kind == "lambda":
        if t > EXPLICIT_MASK_LIMIT:
            return None, f"explicit [T, T] mask too large at T={t}"
        m = lambda_mask(t, w, g)
        return (lambda q, k, v: peer(q, k, v, mask=m, **extra)), None
    window = {"window": (w - 1, 0)}.get(kind)
    return (lambda q, k, v: peer(q, k, v, is_causal=True, local_window_size=window, **extra)), None


def measure(fn, inputs, iters: int):
    """(median seconds, peak temporary bytes) of the compiled fn."""
    compiled = jax.jit(fn).lower(*inputs).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp


def with_grad(fn):
    def loss(q, k, v):
        return fn(q, k, v).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))


def default_peers(platform: str) -> list[str]:
    if platform == "gpu":
        peers = ["ours:pallas_gpu", "jax:cudnn", "jax:xla"]
        if importlib.util.find_spec("tokamax") is not None:
            peers.append("tokamax")
        return peers
    return ["ours:xla", "jax:xla"]


def parse_args(argv):
    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+",
                   default=[4096, 16384, 65536] if gpu else [1024, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8] if gpu else [8, 2],
                   metavar=("N", "K"))
    p.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    p.add_argument("--value-dim", type=int, default=None,
                   help="value head dim U (default: the head dim; MLA: 192/128 or 576/512)")
    p.add_argument("--window", type=int, default=4096 if gpu else 256)
    p.add_argument("--sinks", type=int, default=128 if gpu else 16)
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    p.add_argument("--peers", nargs="+", default=None,
                   help="ours:<implementation>, jax:cudnn, jax:xla, tokamax")
    p.add_argument("--iters", type=int, default=10 if gpu else 3)
    args = p.parse_args(argv)
    args.peers = args.peers or default_peers(jax.default_backend())
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    (n, kh), h, b = args.heads, args.head_dim, args.batch
    u = args.value_dim or h
    dt = jnp.dtype(args.dtype)
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"B={b} N={n} K={kh} H={h} U={u} {dt.name}, window={args.window} sinks={args.sinks}")
    head = (f"{'mask':7} {'T':>6} {'implementation':16} {'fwd ms':>9} {'TFLOP/s':>8} "
            f"{'f+b ms':>9} {'TFLOP/s':>8} {'fwd tmp MiB':>11} {'f+b tmp MiB':>11} "
            f"{'ours/peer':>9}")
    print(head)
    rng = np.random.default_rng(0)
    for t in args.seq:
        q = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32), dt)
        k = jnp.asarray(rng.standard_normal((b, t, kh, h), np.float32), dt)
        v = jnp.asarray(rng.standard_normal((b, t, kh, u), np.float32), dt)
        for kind in args.masks:
            fwd_flops = 2 * (h + u) * visible_pairs(kind, t, args.window, args.sinks) * n * b
            ours_time = None
            for impl in args.peers:
                fn, why = runners(kind, impl, args, t)
                if fn is None:
                    print(f"{kind:7} {t:>6} {impl:16} skipped: {why}")
                    continue
                try:
                    tf, mf = measure(fn, (q, k, v), args.iters)
                    tb, mb = measure(with_grad(fn), (q, k, v), args.iters)
                except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:  # peer gaps
                    print(f"{kind:7} {t:>6} {impl:16} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:80]}")
                    continue
                if impl.startswith("ours"):
                    ours_time = (tf, tb)
                ratio = ("" if ours_time is None
                         else f"{ours_time[0] / tf:.2f}/{ours_time[1] / tb:.2f}")
                mib = lambda x: f"{x / 2**20:11.1f}" if x is not None else f"{'n/a':>11}"
                print(f"{kind:7} {t:>6} {impl:16} {tf * 1e3:9.2f} {fwd_flops / tf / 1e12:8.3f} "
                      f"{tb * 1e3:9.2f} {3.5 * fwd_flops / tb / 1e12:8.3f} {mib(mf)} {mib(mb)} "
                      f"{ratio:>9}", flush=True)
    print("# ours/peer: time ratio forward/forward+backward (below 1: ours is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
