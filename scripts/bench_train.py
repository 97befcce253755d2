"""Training throughput of a small Llama at long sequence lengths: tokens/s, MFU, peak memory.

    python scripts/bench_train.py                       # 4K, 16K, 64K; CPU: 1 and 8 devices
    python scripts/bench_train.py --seq 4096 --steps 3  # a quick look

Every configuration runs in a fresh process (clean device count and peak memory), as one
sequence per step: on 1 device with the chunked loss and with full [T, V] logits; on 8 devices
(simulated on CPU) with the sequence split 8 ways over the `seq` mesh axis, by ring attention
(zigzag layout) or by XLA's own partitioning of plain attention (`context_parallel: none`), both
with the chunked loss. Compilation (ahead of time) is reported apart from the timed steps (the
median of `--steps`; the first executed step is timed too, as nothing is left to compile). MFU counts model FLOPs
(jaxllama.training.metrics.flops_per_token) against the peak: the accelerator's table entry, or
on CPU a measured float32 matmul rate of the whole host (simulated devices share its cores).
Peak memory is the process's peak resident set on CPU, the device's peak bytes in use on GPU;
"peak/device" is XLA's own figure for the compiled SPMD program, per device: arguments + outputs
- donated aliases + temporaries (`compiled.memory_analysis()`), which on simulated CPU devices is
what one real device would need.

    python scripts/bench_train.py --per-device 8192 --memory-only   # 1, 2, 4, 8 devices
    python scripts/bench_train.py --per-device 8192 --pattern dense,lambda --memory-only

`--per-device N` is the scaling mode: N tokens per device on 1, 2, 4 and 8 devices (ring
attention from 2 on), so a flat per-device peak shows that context parallelism costs no memory
beyond the local share; `--memory-only` compiles without running steps (memory columns only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODEL = {"vocab_size": 8192, "hidden_size": 128, "intermediate_size": 384, "num_layers": 2,
         "layer_pattern": "dense", "max_position_embeddings": 65536,
         "attention": {"num_heads": 4, "num_kv_heads": 2, "rope": {"theta": 500000.0}}}


def configs(seqs: list[int], devices: int, all_long: bool) -> list[dict]:
    """Per length: 1 device chunked / full logits; N devices ring / XLA-sharded. From 32K on, only
    the chunked 1-device and ring rows unless `all_long` (each CPU step takes many minutes)."""
    out = []
    for t in seqs:
        full = all_long or t < 32768
        out.append({"seq": t, "devices": 1, "cp": "none", "loss_chunk": 1024})
        if full:
            out.append({"seq": t, "devices": 1, "cp": "none", "loss_chunk": 0})
        if devices > 1:
            out.append({"seq": t, "devices": devices, "cp": "ring", "loss_chunk": 1024})
            if full:
                out.append({"seq": t, "devices": devices, "cp": "none", "loss_chunk": 1024})
    return out


def scaling_configs(per_device: int, devices: list[int]) -> list[dict]:
    """`per_device` tokens on each of `devices` (ring attention from 2 devices on)."""
    return [{"seq": per_device * d, "devices": d, "cp": "ring" if d > 1 else "none",
             "loss_chunk": 1024} for d in devices]


def compiled_peak(compiled) -> tuple[float, float]:
    """(peak bytes per device, temporaries per device) of a compiled SPMD program."""
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return float(peak), float(m.temp_size_in_bytes)


def run_one(c: dict, steps: int, peak: float) -> dict:
    """Child process: one configuration, printed as JSON."""
    import jax

    if c["devices"] > 1:  # only the CPU backend reads it (simulated devices)
        jax.config.update("jax_num_cpu_devices", c["devices"])
    import numpy as np

    from jaxllama.config import model_config_from_dict
    from jaxllama.model import Transformer
    from jaxllama.parallel import to_zigzag
    from jaxllama.sharding import make_mesh
    from jaxllama.training.metrics import flops_per_token
    from jaxllama.training.optimizer import lr_schedule, make_optimizer
    from jaxllama.training.step import compile_train_step, init_state

    model = dict(MODEL, max_position_embeddings=max(MODEL["max_position_embeddings"], c["seq"]))
    if c.get("pattern"):
        model["layer_pattern"] = c["pattern"].split(",")
        model["num_layers"] = len(model["layer_pattern"])
        model["lambda"] = {"global_tokens": 16, "window": 1024}
    model_cfg = model_config_from_dict({**model, "kernels": {"context_parallel": c["cp"],
                                                             "remat": "full"}})
    model = Transformer(model_cfg)
    mesh = make_mesh({"data": 1, "seq": c["devices"]}, jax.devices()[:c["devices"]])
    tx = make_optimizer(lr_schedule(1e-4, 100, 0))
    state = init_state(model, tx, mesh, jax.random.key(0))
    t = c["seq"]
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, model_cfg.vocab_size, (1, t)).astype(np.int32),
             "targets": rng.integers(0, model_cfg.vocab_size, (1, t)).astype(np.int32),
             "weights": np.ones((1, t), np.float32),
             "positions": np.arange(t, dtype=np.int32)[None],
             "segment_ids": np.ones((1, t), np.int32)}
    if c["cp"] != "none":
        batch = {k: to_zigzag(v, c["devices"]) for k, v in batch.items()}
    from jaxllama.sharding import batch_sharding, use_mesh

    step = compile_train_step(model, tx, mesh, loss_chunk=c["loss_chunk"])
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
    t0 = time.perf_counter()
    with use_mesh(mesh):  # compile ahead of time: the timed steps reuse this executable
        compiled = step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    dev_peak, dev_temp = compiled_peak(compiled)
    if steps == 0:  # memory only
        return {**c, "compile_s": compile_s, "device_peak_gib": dev_peak / 2 ** 30,
                "device_temp_gib": dev_temp / 2 ** 30, "device": jax.devices()[0].device_kind}
    m = None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    tok_s = t / dt
    if jax.devices()[0].platform == "cpu":
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    else:
        mem = max(d.memory_stats().get("peak_bytes_in_use", 0) for d in jax.local_devices())
    return {**c, "step_s": dt, "tokens_per_s": tok_s, "compile_s": compile_s,
            "mfu": flops_per_token(model_cfg, t) * tok_s / peak if peak else 0.0,
            "peak_gib": mem / 2 ** 30, "loss": float(m["loss"]),
            "device_peak_gib": dev_peak / 2 ** 30, "device_temp_gib": dev_temp / 2 ** 30,
            "device": jax.devices()[0].device_kind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--devices", type=int, default=0,
                   help="devices for the sharded rows (CPU: simulated); 0 = 8 on CPU, else all")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--long-steps", type=int, default=1,
                   help="timed steps for sequences of 32K and more (each is minutes on a CPU)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    p.add_argument("--all-long", action="store_true",
                   help="also full logits and XLA-sharded attention at 32K and more")
    p.add_argument("--per-device", type=int, default=0,
                   help="scaling mode: this many tokens per device on --scale-devices devices")
    p.add_argument("--scale-devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--pattern", default="", help="layer kinds, e.g. dense,lambda (default dense)")
    p.add_argument("--memory-only", action="store_true",
                   help="compile only: XLA's per-device memory, no timed steps")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        c = json.loads(args.child)
        print("RESULT " + json.dumps(run_one(c["config"], c["steps"], c["peak"])))
        return 0

    import jax

    from jaxllama.training.metrics import peak_flops

    peak, source = peak_flops()
    on_cpu = jax.devices()[0].platform == "cpu"
    devices = args.devices or (8 if on_cpu else jax.device_count())
    print(f"# bench_train: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {jax.devices()[0].device_kind}, peak {peak / 1e9:.1f} "
          f"GFLOP/s ({source}), {time.strftime('%Y-%m-%d')}")
    print("| seq | devices | attention | loss | tokens/s | MFU | peak mem (GiB) | peak/device "
          "(GiB) | temp/device (GiB) | step (s) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    if args.per_device:
        todo = scaling_configs(args.per_device, args.scale_devices)
    else:
        todo = configs(args.seq, devices, args.all_long or not on_cpu)
    for c in todo:
        c["pattern"] = args.pattern
        steps = args.long_steps if c["seq"] >= 32768 else args.steps
        steps = 0 if args.memory_only else steps
        child = json.dumps({"config": c, "steps": steps, "peak": peak})
        try:
            out = subprocess.run([sys.executable, __file__, "--child", child], check=False,
                                 capture_output=True, text=True, timeout=args.timeout)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(line[-1][7:]) if line else None
            err = (out.stderr.strip().splitlines() or ["failed"])[-1][:80]
        except subprocess.TimeoutExpired:
            r, err = None, f"timeout after {args.timeout}s"
        attn = {"ring": "ring (zigzag)", "none": "plain" if c["devices"] == 1 else "XLA-sharded"}
        if c["cp"] == "ring" and "lambda" in c["pattern"]:
            attn["ring"] = "ring (zigzag) + lambda halo"
        size = f"{c['seq'] // 1024}K" if c["seq"] % 1024 == 0 else str(c["seq"])
        head = (f"| {size} | {c['devices']} | {attn[c['cp']]} | "
                f"{'chunked' if c['loss_chunk'] else 'full logits'} |")
        if r is None:
            print(f"{head} {err} | | | | | | |", flush=True)
        elif steps == 0:
            print(f"{head} | | | {r['device_peak_gib']:.3f} | {r['device_temp_gib']:.3f} | |"
                  f" {r['compile_s']:.1f} |", flush=True)
        else:
            print(f"{head} {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} |"
                  f" {r['device_peak_gib']:.3f} | {r['device_temp_gib']:.3f} |"
                  f" {r['step_s']:.2f} | {r['compile_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
