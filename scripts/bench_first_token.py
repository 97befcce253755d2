"""Time to first token of `python -m jaxllama.generate` in fresh processes: cold and warm.

    python scripts/bench_first_token.py                     # the embedded SmolLM2, this checkout
    python scripts/bench_first_token.py --warm-runs 3 --code /path/to/other/checkout

Cold: a new process with an empty jaxllama cache (`JAXLLAMA_CACHE` and `JAXLLAMA_COMPILE_CACHE`
pointing into a new temporary directory), as on a fresh machine: it loads (and, for a GGUF,
dequantizes) the checkpoint, builds the tokenizer and compiles. Warm: new processes reusing the
cache the cold run filled, as every later start. Each figure is the wall time from spawning the
process to the first byte of streamed answer on its stdout (what a user waits for), and to exit.
`--code DIR` runs another checkout of jaxllama (put on PYTHONPATH), e.g. a `git archive` of an
older commit, to measure before and after a change with the same script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spawn(cmd: list[str], env: dict) -> tuple[float, float]:
    """(seconds to the first byte on stdout, seconds to exit) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    _, err = proc.communicate()
    total = time.perf_counter() - t0
    if proc.returncode != 0 or not first:
        last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{' '.join(cmd[:4])} ...: exit {proc.returncode}: {last}")
    return t_first, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench_first_token.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--code", default=str(ROOT), help="jaxllama checkout to run (PYTHONPATH)")
    args = ap.parse_args(argv)
    if args.warm_runs < 1 or args.max_new_tokens < 1:
        ap.error("--warm-runs and --max-new-tokens must be >= 1")
    cmd = [sys.executable, "-m", "jaxllama.generate", "--prompt", args.prompt,
           "--max-new-tokens", str(args.max_new_tokens)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    with tempfile.TemporaryDirectory(prefix="bench-first-token-") as cache:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
        env.update(PYTHONPATH=args.code, JAXLLAMA_CACHE=cache,
                   JAXLLAMA_COMPILE_CACHE=str(Path(cache) / "xla"), PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false")
        cold = spawn(cmd, env)
        warm = [spawn(cmd, env) for _ in range(args.warm_runs)]
    print(f"code {args.code}, checkpoint {args.checkpoint or 'embedded SmolLM2-135M-Instruct'}, "
          f"{os.cpu_count()} CPUs")
    print("| start | first token (s) | exit (s) |")
    print("|---|---:|---:|")
    print(f"| cold (empty cache) | {cold[0]:.1f} | {cold[1]:.1f} |")
    print(f"| warm (median of {len(warm)}) | {statistics.median(w[0] for w in warm):.1f} | "
          f"{statistics.median(w[1] for w in warm):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
