"""One training step of a tiny Llama at up to 1,048,576 tokens on 8 simulated CPU devices:
per-device memory, time, and the step's gradients against a coarser mesh.

    nice -n 10 python scripts/bench_million.py --memory-only                  # dense, 128K .. 1M
    nice -n 10 python scripts/bench_million.py --pattern lambda,lambda --coarse 4
    nice -n 10 python scripts/bench_million.py --pattern dense,dense --max-minutes 20

The model: `--pattern` layer kinds (dense, lambda), hidden 64, 4 query heads of 16 over 2 kv
heads, MLP 128, vocab 256, lambda window `--window` with `--sinks` sinks; float32, full remat,
the chunked loss (`--loss-chunk` tokens per piece), AdamW. One sequence of T tokens per step,
T = --start, 2 x --start, ... --max, split over the `seq` axis of --devices simulated devices in
the zigzag layout: ring attention for dense layers, the halo exchange for lambda layers. Each T
runs in a fresh process (clean device count and peak memory) that

1. compiles the step ahead of time; XLA's memory analysis of the compiled SPMD program gives the
   per-device peak (`bench_train.compiled_peak`). Simulated devices share this host, so T fits
   when devices x peak is within --host-gib; the first T that does not fit ends the doubling;
2. runs the step once (timed), unless its estimated time exceeds --max-minutes. The estimate
   scales the last time measured (the first is `--probe`, a short length timed before anything
   else) by the growth between the last two lengths measured (exponent clipped to [1, 2]), or,
   from one length, quadratically with a dense layer and linearly without (a lambda layer's work
   is linear in T: window + sinks per query);
3. with --coarse D, the same step also runs on D devices and the gradients of every parameter
   are compared. The gradients are the step's own: the optimizer's first transform passes
   updates through and keeps the last gradient tree as its state (`keep_grads`).

`--memory-only` stops after 1 (compile without running: whether a length fits costs no step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import compiled_peak  # scripts/ is not a package: import by path

from jaxllama.cpu_flags import cpu_info

MODEL = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "attention": {"num_heads": 4, "num_kv_heads": 2, "rope": {"theta": 500000.0}},
         "lambda": {"global_tokens": 16, "window": 1024}}


def keep_grads():
    """An optax transform that passes updates through and keeps them as its state: first in a
    chain, `opt_state[0]` after a step holds the gradients the step computed."""
    import jax
    import jax.numpy as jnp
    import optax

    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


def run_one(c: dict) -> dict:
    """Child process: compile (and maybe run) the step of config `c`; a JSON-able result."""
    import jax

    jax.config.update("jax_num_cpu_devices", c["devices"])
    import numpy as np
    import optax

    from jaxllama.config import model_config_from_dict
    from jaxllama.model import Transformer
    from jaxllama.parallel import to_zigzag
    from jaxllama.sharding import batch_sharding, make_mesh, use_mesh
    from jaxllama.training.optimizer import lr_schedule, make_optimizer
    from jaxllama.training.step import compile_train_step, init_state

    t, ways = c["seq"], c["devices"]
    kinds = c["pattern"].split(",")
    model_cfg = model_config_from_dict({
        **MODEL, "lambda": {"global_tokens": c["sinks"], "window": c["window"]},
        "layer_pattern": kinds, "num_layers": len(kinds), "max_position_embeddings": t,
        "kernels": {"context_parallel": "ring" if ways > 1 else "none", "remat": "full"}})
    model = Transformer(model_cfg)
    mesh = make_mesh({"data": 1, "seq": ways}, jax.devices()[:ways])
    tx = optax.chain(keep_grads(), make_optimizer(lr_schedule(1e-4, 100, 0)))
    state = init_state(model, tx, mesh, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, model_cfg.vocab_size, (1, t)).astype(np.int32),
             "targets": rng.integers(0, model_cfg.vocab_size, (1, t)).astype(np.int32),
             "weights": np.ones((1, t), np.float32),
             "positions": np.arange(t, dtype=np.int32)[None],
             "segment_ids": np.ones((1, t), np.int32)}
    batch = {k: jax.device_put(to_zigzag(v, ways), batch_sharding(mesh)) for k, v in batch.items()}
    step = compile_train_step(model, tx, mesh, loss_chunk=c["loss_chunk"])
    t0 = time.perf_counter()
    with use_mesh(mesh):
        compiled = step.jitted.lower(state, batch).compile()
    out = {"compile_s": time.perf_counter() - t0}
    peak, temp = compiled_peak(compiled)
    out.update(device_peak_gib=peak / 2 ** 30, device_temp_gib=temp / 2 ** 30,
               fits=ways * peak <= c["host_gib"] * 2 ** 30)
    if not (c["run"] and out["fits"]):
        return out
    print("COMPILED " + json.dumps(out), flush=True)  # the memory figures, should the run fail
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    m = jax.device_get(m)
    out.update(step_s=time.perf_counter() - t0, loss=float(m["loss"]),
               grad_norm=float(m["grad_norm"]), finite=bool(m["finite"]),
               rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    if c.get("grads_out"):
        grads = jax.device_get(state.opt_state[0])
        flat = {jax.tree_util.keystr(p): np.asarray(g)
                for p, g in jax.tree_util.tree_leaves_with_path(grads)}
        np.savez(c["grads_out"], **flat)
    return out


def compare_grads(a_path: str, b_path: str) -> tuple[bool, float, int]:
    """(every leaf allclose at float32 tolerance, worst max|a - b| / max|b| over leaves, number
    of parameters compared) of two gradient files."""
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    ok, worst, count = set(a.files) == set(b.files), 0.0, 0
    for k in b.files:
        x, y = a[k], b[k]
        scale = float(np.max(np.abs(y))) or 1.0
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
        ok &= bool(np.allclose(x, y, rtol=1e-4, atol=1e-5 * scale))
        count += y.size
    return ok, worst, count


def estimate(timed: list[tuple[int, float]], t: int, dense: bool) -> float | None:
    """Seconds one step at T = t is expected to take, from (T, step seconds) already measured."""
    if not timed:
        return None
    t1, s1 = timed[-1]
    if len(timed) >= 2:
        t0, s0 = timed[-2]
        p = min(2.0, max(1.0, math.log(s1 / s0) / math.log(t1 / t0)))
    else:
        p = 2.0 if dense else 1.0
    return s1 * (t / t1) ** p


def child(c: dict, timeout: int) -> tuple[dict | None, str]:
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(c)], check=False,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout}s"
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    lines = out.stderr.strip().splitlines() or ["failed"]
    err = next((ln for ln in reversed(lines) if "RESOURCE_EXHAUSTED" in ln or "Error" in ln),
               lines[-1])[:100]
    if not line:
        compiled = [ln for ln in out.stdout.splitlines() if ln.startswith("COMPILED ")]
        if compiled:  # compiled, then the run failed: keep the memory figures
            return {**json.loads(compiled[-1][9:]), "failed": err}, err
    return (json.loads(line[-1][7:]) if line else None), err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pattern", default="dense,dense", help="layer kinds, comma-separated")
    p.add_argument("--start", type=int, default=131072, help="first total length (tokens)")
    p.add_argument("--max", type=int, default=1048576, help="last total length (tokens)")
    p.add_argument("--devices", type=int, default=8, help="simulated devices of the seq axis")
    p.add_argument("--coarse", type=int, default=0,
                   help="also run on this many devices and compare gradients (0: no)")
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens per loss piece")
    p.add_argument("--host-gib", type=float, default=24.0,
                   help="host memory the simulated devices share (GiB)")
    p.add_argument("--max-minutes", type=float, default=20.0,
                   help="do not run a length whose estimated step time (all meshes) is longer")
    p.add_argument("--probe", type=int, default=16384,
                   help="first time one step at this total length (the estimate's base; 0: no)")
    p.add_argument("--window", type=int, default=MODEL["lambda"]["window"], help="lambda window")
    p.add_argument("--sinks", type=int, default=MODEL["lambda"]["global_tokens"],
                   help="lambda sink tokens")
    p.add_argument("--memory-only", action="store_true", help="compile only, no step runs")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per process")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_one(json.loads(args.child))))
        return 0
    kinds = args.pattern.split(",")
    bad = [k for k in kinds if k not in ("dense", "lambda")]
    if bad:
        print(f"error: --pattern: unknown layer kinds {bad} (this bench takes dense, lambda)",
              file=sys.stderr)
        return 2
    if args.start <= 0 or args.max < args.start:
        print(f"error: --start {args.start} must be > 0 and <= --max {args.max}", file=sys.stderr)
        return 2
    cpu = cpu_info()
    print(f"# bench_million: {cpu.model} ({cpu.summary()}), {os.cpu_count()} cores, "
          f"pattern {args.pattern}, "
          f"{args.devices} simulated devices, nice {os.nice(0)}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| tokens | per device | devices | peak/device (GiB) | temp/device (GiB) | x devices "
          "(GiB) | host RSS (GiB) | compile (s) | step (s) | loss | finite | gradients vs "
          "coarser mesh |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    timed: list[tuple[int, float]] = []
    dense = "dense" in kinds
    t = args.start
    base = {"pattern": args.pattern, "loss_chunk": args.loss_chunk, "host_gib": args.host_gib,
            "window": args.window, "sinks": args.sinks}
    if args.probe and not args.memory_only:
        probe = {**base, "seq": args.probe, "devices": args.devices, "run": True}
        r, err = child(probe, args.timeout)
        if r is not None and "step_s" in r:
            timed.append((args.probe, r["step_s"]))
        _print_row(probe, r, err, None, args)
    with tempfile.TemporaryDirectory() as tmp:
        while t <= args.max:
            meshes = 2 if args.coarse else 1
            est = estimate(timed, t, dense)
            run = not args.memory_only and (est is None or est * meshes <= 60 * args.max_minutes)
            fine = {**base, "seq": t, "devices": args.devices, "run": run,
                    "grads_out": os.path.join(tmp, f"{t}_fine.npz") if args.coarse else ""}
            r, err = child(fine, args.timeout)
            rows = [(fine, r, err)]
            if r is not None and "step_s" in r:
                timed.append((t, r["step_s"]))
                if args.coarse:
                    coarse = dict(fine, devices=args.coarse,
                                  grads_out=os.path.join(tmp, f"{t}_coarse.npz"))
                    rc, err_c = child(coarse, args.timeout)
                    if rc is not None and "step_s" in rc:
                        ok, worst, n = compare_grads(fine["grads_out"], coarse["grads_out"])
                        rc["grads"] = (f"{'equal' if ok else 'DIFFER'}: worst max|diff|/max|g| "
                                       f"{worst:.1e} over {n} params, loss diff "
                                       f"{abs(rc['loss'] - r['loss']):.1e}")
                    rows.append((coarse, rc, err_c))
            for c, res, e in rows:
                _print_row(c, res, e, est if c is fine else None, args)
            if r is None or not r["fits"] or "failed" in r:
                break
            t *= 2
    return 0


def _print_row(c: dict, r: dict | None, err: str, est: float | None, args) -> None:
    size = lambda n: f"{n // 1024}K" if n % 1024 == 0 else str(n)
    head = f"| {size(c['seq'])} | {size(c['seq'] // c['devices'])} | {c['devices']} |"
    if r is None:
        print(f"{head} {err} | | | | | | | | |", flush=True)
        return
    mem = (f" {r['device_peak_gib']:.3f} | {r['device_temp_gib']:.3f} |"
           f" {c['devices'] * r['device_peak_gib']:.2f} |")
    if not r["fits"]:
        print(f"{head}{mem} | {r['compile_s']:.0f} | does not fit in {args.host_gib:g} GiB | | |"
              " |", flush=True)
    elif "step_s" not in r:
        why = ("compiled only" if args.memory_only else f"run failed: {r['failed']}"
               if "failed" in r else f"not run: estimated {est / 60:.0f} min per step")
        print(f"{head}{mem} | {r['compile_s']:.0f} | {why} | | | |", flush=True)
    else:
        print(f"{head}{mem} {r['rss_gib']:.2f} | {r['compile_s']:.0f} | {r['step_s']:.0f} |"
              f" {r['loss']:.4f} | {r['finite']} | {r.get('grads', '')} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
