"""Zebra-Llama on SmolLM2 (configs/recipes/zebra-smollm2-cpu.yaml): the hybrid after each stage
against its teacher, an answer, and decode speed and cache bytes against the dense teacher.

    python scripts/bench_zebra.py --run runs/zebra-smollm2-cpu \\
        --eval-text /path/to/idlelib/HISTORY.txt --contexts 2048 8192 32768

1. Quality on held-out text (`--eval-text`, cut into `--eval-rows` rows of `--eval-len` tokens):
   per token KL(teacher || model) in nats and the model's perplexity, for the teacher and for
   each stage's `final/` of the run (hybridize = the init, ild = after stage 1, kl = after
   stage 2), float32 full forwards.
2. Greedy answers to `--prompt` (chat template) of the teacher and of the last stage.
3. Greedy decode at each context, batch 1, float32, the engine's CPU decode layout (unstacked,
   separate head, MLA absorbed) in one jitted on-device loop of `--steps` tokens (the cache
   updated in place, as the engine runs it; bench_long_decode's loop), for the dense teacher and
   the last stage: the cache holds `context - 1` entries filled with random values instead of a
   real prefill (a 32K prefill takes most of an hour on a 2-core CPU; a decode step's cost does
   not depend on the cached values: attention reads every written slot, the Mamba2 state is
   constant-size).
   Both models' contexts are raised to the largest one for this (SmolLM2 is trained to 8192).
   Cache bytes are the planner's (`jaxllama.kvcache.plan`): the sequence-growing keys/values
   and the whole allocated cache (recurrent state and bookkeeping included).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_long_decode import LAYOUT, decode_loop  # the engine's CPU decode layout and loop
from bench_mla import filled_cache  # the same random fill as the MLA bench

from jaxllama.api import LLM
from jaxllama.checkpoint import load_checkpoint
from jaxllama.inference.decode import decode_weights
from jaxllama.kvcache import plan
from jaxllama.model import Transformer

STAGES = ("hybridize", "ild", "kl")


def eval_rows(tokenizer, path: Path, rows: int, length: int) -> np.ndarray:
    """[rows, length + 1] token ids: consecutive windows of the text."""
    ids = np.asarray(tokenizer(path.read_text())["input_ids"], np.int32)
    need = rows * (length + 1)
    if len(ids) < need:
        raise SystemExit(f"bench_zebra: {path} has {len(ids)} tokens, {need} needed "
                         "(lower --eval-rows or --eval-len)")
    return ids[:need].reshape(rows, length + 1)


def logits_fn(cfg):
    model = Transformer(cfg)
    return jax.jit(lambda p, ids: model.apply({"params": p}, ids)[0])


def quality(teacher, students: dict, rows: np.ndarray) -> list[tuple[str, float, float]]:
    """(name, KL(teacher || model) per token, perplexity) of the teacher and each student."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    lp_t = jax.nn.log_softmax(logits_fn(teacher.config)(teacher.params, inputs), -1)

    def measure(lp):
        kl = float(jnp.mean(jnp.sum(jnp.exp(lp_t) * (lp_t - lp), -1)))
        ce = -jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1)[..., 0]
        return kl, float(jnp.exp(jnp.mean(ce)))

    out = [("teacher", *measure(lp_t))]
    fn = None
    for name, ck in students.items():
        fn = fn or logits_fn(ck.config)  # one compile: the stages share the config
        out.append((name, *measure(jax.nn.log_softmax(fn(ck.params, inputs), -1))))
    return out


def decode_seconds(cfg, params, context: int, steps: int, repeats: int = 3) -> float:
    """Seconds per token of `steps` greedy decode steps in one jitted on-device loop (the cache
    updated in place, as the engine decodes), starting with `context - 1` cached (random) tokens
    in a cache of `context + steps` slots; best of `repeats` after a warm-up run."""
    weights = decode_weights(cfg, params, jnp.float32, LAYOUT)
    cache = filled_cache(cfg, context + steps, LAYOUT, jnp.float32)
    slots = context + steps

    def rewind(a):  # keep `context - 1` entries written: the slot count and the segment ids
        if a.ndim == 0:
            return jnp.full((), context - 1, a.dtype)
        if jnp.issubdtype(a.dtype, jnp.integer) and a.shape[-1] == slots:
            return (jnp.arange(slots) < context - 1).astype(a.dtype) * jnp.ones_like(a)
        return a

    cache = jax.tree.map(rewind, cache)
    fn = decode_loop(cfg, steps)
    tok, pos = jnp.asarray(1, jnp.int32), jnp.asarray(context - 1, jnp.int32)
    fn(weights, cache, tok, pos).block_until_ready()  # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(weights, cache, tok, pos).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the recipe's output_dir")
    ap.add_argument("--teacher", default=None, help="teacher checkpoint (default: embedded)")
    ap.add_argument("--eval-text", type=Path, help="held-out text (skip quality without it)")
    ap.add_argument("--eval-rows", type=int, default=4)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--contexts", type=int, nargs="*", default=[2048, 8192, 32768])
    ap.add_argument("--steps", type=int, default=32,
                    help="decode steps per timed on-device loop")
    args = ap.parse_args(argv)
    finals = {s: args.run / s / "final" for s in STAGES if (args.run / s / "final").is_dir()}
    if not finals:
        print(f"bench_zebra: no <stage>/final under {args.run}", file=sys.stderr)
        return 2
    teacher = load_checkpoint(args.teacher, "float32")
    students = {name: load_checkpoint(str(path), "float32") for name, path in finals.items()}
    last_name, last = list(students.items())[-1]
    print(f"teacher {teacher.source}; stages {', '.join(students)}", flush=True)

    if args.eval_text is not None:
        rows = eval_rows(teacher.tokenizer, args.eval_text, args.eval_rows, args.eval_len)
        print(f"\nheld-out {args.eval_text.name}: {rows.shape[0]} x {args.eval_len} tokens")
        print(f"{'model':<20}{'KL to teacher':>15}{'perplexity':>12}")
        for name, kl, ppl in quality(teacher, students, rows):
            print(f"{name:<20}{kl:>15.4f}{ppl:>12.2f}", flush=True)

    if args.max_new_tokens > 0:
        print(f"\nprompt {args.prompt!r} (greedy, {args.max_new_tokens} new tokens):")
        for name, ck in (("teacher", teacher), (last_name, last)):
            llm = LLM(ck.config, ck.params, ck.tokenizer, ck.generation_config, ck.source)
            text = llm.generate(args.prompt, max_new_tokens=args.max_new_tokens).text
            print(f"  {name}: {text!r}", flush=True)

    if args.contexts:
        longest = max(args.contexts)
        models = {"dense teacher": teacher, f"hybrid ({last_name})": last}
        print(f"\ndecode, batch 1, float32, {args.steps} steps per on-device loop, best of 3, random-filled cache")
        print(f"{'model':<18}{'context':>8}{'kv bytes':>15}{'cache bytes':>15}{'ms/token':>10}"
              f"{'tokens/s':>10}")
        for context in args.contexts:
            for name, ck in models.items():
                cfg = ck.config.replace(max_position_embeddings=max(
                    longest, ck.config.max_position_embeddings))
                p = plan(cfg, context, batch=1, dtype="float32")
                sec = decode_seconds(cfg, ck.params, context, args.steps)
                print(f"{name:<18}{context:>8}{p.kv_growing_bytes:>15,}{p.total_bytes:>15,}"
                      f"{1e3 * sec:>10.1f}{1 / sec:>10.2f}", flush=True)
                # one process ran out of memory (12 GB RSS) at the hybrid's 32K row after the
                # dense one, while each alone peaks under 3 GB: free every row's programs
                jax.clear_caches()
                gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
