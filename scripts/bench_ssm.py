"""Selective-scan benchmark: forward and forward+backward time of each ssm_scan form at several
sequence lengths, Mamba2 (`ssd_scan`) and Mamba1 (`selective_scan`).

Forms: `sequential` (reference.ssd_sequential / selective_sequential, the lax.scan specification),
`chunked` (the chunked SSD, the `xla` implementation; the chunked associative scan, which `xla`
runs for Mamba1 off CPU), and `pallas` (the platform's own kernels, `pallas_gpu` or `pallas_tpu`:
the SSD kernels for Mamba2, the sequential selective-scan kernels for Mamba1; skipped on CPU,
where they run only in the interpreter, which times nothing useful).

  python scripts/bench_ssm.py                    # GPU/TPU: Mamba2-2.7B / Mamba-2.8B layer sizes,
                                                 #   S 4K, 16K, 64K, bf16
  python scripts/bench_ssm.py                    # CPU: the same lengths, reduced layers (--help)

Layer sizes, one layer's scan (batch 1): Mamba2-2.7B has d_model 2560, expand 2 (d_inner 5120),
head dim 64 (80 heads), d_state 128, 1 group (its own chunk is 256; here each
implementation's heuristic chunk unless --chunk is given); Mamba-2.8B (Mamba1) d_inner 5120, d_state
16. The time covers the scan only (no projections, conv or norm). Each row: median of --iters runs
after one warm-up call (compile excluded); forward+backward is jax.grad of sum(y) + sum(final
state) with respect to every float input.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jaxllama.kernels.ssm_scan import heuristics, reference
from jaxllama.kernels.ssm_scan.api import selective_scan, ssd_scan

FORMS = ("sequential", "chunked", "pallas")
KINDS = ("mamba2", "mamba1")


def inputs(kind: str, args, s: int):
    """Random inputs of one layer at length s: dict of arrays (dt/delta positive, A negative)."""
    rng = np.random.default_rng(0)
    dt = jnp.dtype(args.dtype)
    f = lambda *shape, d=dt: jnp.asarray(rng.standard_normal(shape, np.float32), d)
    b, g, n = args.batch, args.groups, args.state
    if kind == "mamba2":
        h, p = args.heads, args.head_dim
        return {"x": f(b, s, h, p), "dt": jax.nn.softplus(f(b, s, h) - 2).astype(dt),
                "A": -jnp.exp(f(h, d=jnp.float32)), "B": f(b, s, g, n), "C": f(b, s, g, n),
                "D": f(h, d=jnp.float32)}
    d = args.d_inner
    return {"u": f(b, s, d), "delta": jax.nn.softplus(f(b, s, d) - 2).astype(dt),
            "A": -jnp.exp(f(d, args.mamba1_state, d=jnp.float32)),
            "B": f(b, s, g, args.mamba1_state), "C": f(b, s, g, args.mamba1_state),
            "D": f(d, d=jnp.float32)}


def scan_fn(kind: str, form: str, args):
    """fn(**inputs) -> (y, final) for one (kind, form), or a string saying why it does not run."""
    plat = jax.default_backend()
    if form == "pallas":
        if plat not in ("gpu", "tpu"):
            return f"not run ({plat}: the kernels run natively on GPU/TPU only)"
        impl = f"pallas_{plat}"
        if kind == "mamba1":  # --chunk: the kernels' checkpoint spacing
            return lambda **a: selective_scan(**a, chunk_size=args.chunk, implementation=impl)
        return lambda **a: ssd_scan(**a, chunk_size=args.chunk, implementation=impl)
    if form == "sequential":
        return (lambda **a: reference.ssd_sequential(**a)) if kind == "mamba2" else (
            lambda **a: reference.selective_sequential(**a))
    if kind == "mamba2":
        return lambda **a: ssd_scan(**a, chunk_size=args.chunk, implementation="xla")
    # the chunked associative scan itself (`xla` runs the sequential form on CPU)
    return lambda **a: reference.selective_chunked(
        **a, chunk_size=heuristics.reference_selective_chunk(a["u"].shape[1]))


def with_grad(fn):
    def loss(a):
        y, final = fn(**a)
        return y.astype(jnp.float32).sum() + final.sum()
    return jax.grad(loss)


def measure(fn, a, iters: int) -> float:
    """Median milliseconds of jitted fn(a) over `iters` runs after a warm-up (compile) call."""
    jax.block_until_ready(fn(a))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(a))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def parse_args(argv):
    native = jax.default_backend() in ("gpu", "tpu")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536],
                   help="sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=80 if native else 4, help="Mamba2 heads")
    p.add_argument("--head-dim", type=int, default=64 if native else 32)
    p.add_argument("--state", type=int, default=128 if native else 32, help="Mamba2 d_state")
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--chunk", type=int, default=None,
                   help="Mamba2 chunk, or the Mamba1 kernels' checkpoint spacing (default: each "
                   "implementation's heuristics.py choice)")
    p.add_argument("--d-inner", type=int, default=5120 if native else 256, help="Mamba1 width")
    p.add_argument("--mamba1-state", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16" if native else "float32",
                   choices=("float32", "bfloat16"))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--iters", type=int, default=10 if native else 3)
    p.add_argument("--no-backward", action="store_true", help="forward only")
    args = p.parse_args(argv)
    for name in ("batch", "heads", "head_dim", "state", "groups", "chunk", "d_inner",
                 "mamba1_state", "iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.seq) < 1:
        p.error(f"--seq lengths must be >= 1, got {args.seq}")
    if args.heads % args.groups or args.d_inner % args.groups:
        p.error(f"--groups {args.groups} must divide --heads {args.heads} and --d-inner "
                f"{args.d_inner}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = jax.devices()[0]
    print(f"# {dev.platform} {dev.device_kind}, JAX {jax.__version__}, {args.dtype}, batch "
          f"{args.batch}; mamba2 H {args.heads} P {args.head_dim} N {args.state} G {args.groups} "
          f"chunk {args.chunk or 'auto'}; mamba1 D {args.d_inner} N {args.mamba1_state}; median of "
          f"{args.iters}")
    print("| kind | S | form | fwd ms | f+b ms |")
    print("|---|---|---|---|---|")
    for kind in args.kinds:
        for s in args.seq:
            a = inputs(kind, args, s)
            for form in args.forms:
                fn = scan_fn(kind, form, args)
                if isinstance(fn, str):
                    print(f"| {kind} | {s} | {form} | {fn} | |", flush=True)
                    continue
                fwd = measure(jax.jit(lambda a, fn=fn: fn(**a)), a, args.iters)
                fb = "" if args.no_backward else (
                    f"{measure(jax.jit(with_grad(fn)), a, args.iters):.1f}")
                print(f"| {kind} | {s} | {form} | {fwd:.1f} | {fb} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
