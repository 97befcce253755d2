"""Host memory of simulated CPU devices against XLA's own figure: where a long ring step's RSS goes.

    python scripts/bench_host_memory.py                       # T 8K, 16K; 1, 2, 8 devices
    python scripts/bench_host_memory.py --lengths 32768 --devices 2,8

Each row runs in a fresh process with D simulated CPU devices (`jax_num_cpu_devices`): every device
does the same causal attention of T local tokens (4 query / 2 kv heads of 16, float32, the `xla`
blockwise kernel, `shard_map` over D devices with no communication), once, forward only. It
prints XLA's memory analysis of the compiled program (temporaries per device, times D), the
process's resident memory before and after the call, and the number of 256 x 256 kernel blocks
each device runs. With one device the call adds about what XLA says; with several, the resident
memory grows with the blocks run (not with the bytes XLA allocates), so a dense step whose blocks
grow as T^2 needs far more host memory than XLA's per-device peak on simulated devices
(BENCHMARKS.md, "One million tokens").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from jaxllama.cpu_flags import cpu_info


def run_one(t: int, devices: int) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from jaxllama.kernels.flash_attention.api import Mask, attend
    from jaxllama.kernels.flash_attention.heuristics import reference_blocks
    from jaxllama.kernels.flash_attention.mask import kv_block_ranges, ordinary_columns

    mesh = jax.make_mesh((devices,), ("d",))
    spec = PartitionSpec("d")
    rng = np.random.default_rng(0)
    arrays = [jax.device_put(jnp.asarray(rng.standard_normal((devices, t, heads, 16), np.float32)),
                             NamedSharding(mesh, spec)) for heads in (4, 2, 2)]
    local = lambda q, k, v: attend(q, k, v, Mask(causal=True), implementation="xla")
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                               check_vma=False))
    compiled = fn.lower(*arrays).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    before = rss()
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*arrays))
    bq, bk = reference_blocks(t, t)
    lo, hi = kv_block_ranges(ordinary_columns(Mask(causal=True)), 0, 0, t, bq, t, bk)
    blocks = int(jnp.sum(hi - lo))  # the key blocks the kernel visits
    return {"seconds": time.perf_counter() - t0, "xla_temp_gib": devices * temp / 2 ** 30,
            "rss_before_gib": before, "rss_after_gib": rss(), "blocks_per_device": blocks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="8192,16384", help="local tokens per device, comma-separated")
    p.add_argument("--devices", default="1,2,8", help="simulated device counts, comma-separated")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        t, d = (int(x) for x in args.child.split(","))
        print("RESULT " + json.dumps(run_one(t, d)))
        return 0
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        counts = [int(x) for x in args.devices.split(",")]
    except ValueError:
        print("error: --lengths and --devices take comma-separated integers", file=sys.stderr)
        return 2
    if min(lengths + counts) < 1:
        print("error: --lengths and --devices must be positive", file=sys.stderr)
        return 2
    cpu = cpu_info()
    print(f"# bench_host_memory: {cpu.model} ({cpu.summary()}), {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("| local tokens | devices | blocks per device | XLA temporaries x devices (GiB) | RSS "
          "before (GiB) | RSS after (GiB) | added (GiB) | added per block and device (KiB) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in lengths:
        for d in counts:
            out = subprocess.run([sys.executable, __file__, "--child", f"{t},{d}"],
                                 capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                err = (out.stderr.strip().splitlines() or ["failed"])[-1][:100]
                print(f"| {t} | {d} | {err} | | | | | | |", flush=True)
                continue
            r = json.loads(line[0][7:])
            added = r["rss_after_gib"] - r["rss_before_gib"]
            per = added * 2 ** 20 / (d * r["blocks_per_device"])
            print(f"| {t} | {d} | {r['blocks_per_device']} | {r['xla_temp_gib']:.3f} | "
                  f"{r['rss_before_gib']:.3f} | {r['rss_after_gib']:.3f} | {added:.3f} | "
                  f"{per:.1f} | {r['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
