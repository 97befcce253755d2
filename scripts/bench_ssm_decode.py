"""Decode tokens/s of an all-`mamba2` SmolLM2-sized model (random weights) at long context.

    python scripts/bench_ssm_decode.py --decode --contexts 2048,32768 --steps 64
    python scripts/bench_ssm_decode.py --decode --tiny          # seconds: proves the script

The model keeps SmolLM2-135M's geometry (hidden 576, 30 layers, SwiGLU MLP 1536, vocab 49152,
tied embeddings) with every attention layer replaced by Mamba2 the way Zebra-Llama converts one
(`--variant zebra`: d_inner = hidden, one SSM head per attention head (9), head_dim = d_state =
64, x and B at the 3 kv heads' width) or transformers' defaults (`--variant hf`: expand 2, head_dim
64, d_state 128, 1 group). For each context N a prompt of N random tokens is really prefilled
through the engine (chunks of `--prefill-chunk`), then `--steps` greedy tokens are decoded in the
engine's on-device loop; the engine's own timers give prefill and decode tokens/s (programs are
compiled ahead, outside the timings, and warmed by one short run first). A
Mamba2 cache is a conv window and an SSM state whatever N, so decode tokens/s should not depend
on N; the planner's cache bytes are printed beside it.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from jaxllama.api import LLM
from jaxllama.config import Mamba2Config, ModelConfig
from jaxllama.kvcache import plan
from jaxllama.model import init_params

VARIANTS = {
    "zebra": Mamba2Config(num_heads=9, head_dim=64, state_size=64, n_groups=9, xb_heads=3,
                          expand=1),
    "hf": Mamba2Config(head_dim=64, state_size=128, n_groups=1, expand=2),
}


def model_config(variant: str, tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                           layer_pattern=("mamba2",) * 2, tie_word_embeddings=True,
                           mamba2=Mamba2Config(head_dim=16, state_size=16, n_groups=2,
                                               chunk_size=16))
    return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       layer_pattern=("mamba2",) * 30, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, mamba2=VARIANTS[variant])


def run(llm: LLM, n: int, steps: int, prefill_chunk: int, seed: int):
    prompt = np.random.default_rng(seed).integers(0, llm.config.vocab_size, n).tolist()
    return llm.engine(prefill_chunk=prefill_chunk).generate([prompt], steps, eos_ids=[], pad_id=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decode", action="store_true", required=True,
                    help="the decode benchmark (the only part of this script)")
    ap.add_argument("--contexts", default="2048,32768", help="comma-separated prompt lengths")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per context")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="zebra")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy at contexts 64 and 512")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        if args.tiny:
            contexts = [64, 512]
        if min(contexts) <= 0 or args.steps < 2 or args.prefill_chunk <= 0:
            raise ValueError
    except ValueError:
        print("error: --contexts must be positive integers, --steps >= 2, --prefill-chunk > 0",
              file=sys.stderr)
        return 2
    cfg = model_config(args.variant, args.tiny)
    params = init_params(cfg, jax.random.key(args.seed))
    nparams = sum(a.size for a in jax.tree.leaves(params))
    llm = LLM(cfg, params, None, {"eos_token_ids": [], "pad_token_id": 0}, "random",
              verbose=False)
    print(f"all-mamba2 {'tiny' if args.tiny else 'SmolLM2-sized'} ({args.variant}): "
          f"{cfg.num_layers} layers, {nparams / 1e6:.1f}M params, backend {jax.default_backend()}")
    print(f"{'context':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'cache bytes':>14}"
          f"{'growing':>10}")
    # warm-up: compiles the prefill chunk and decode programs every context then reuses (the
    # engine compiles ahead of time, outside its timers; this run also warms the caches)
    run(llm, min(contexts[0], args.prefill_chunk), args.steps, args.prefill_chunk, args.seed)
    for n in contexts:
        out = run(llm, n, args.steps, args.prefill_chunk, args.seed)
        p = plan(cfg, n + args.steps, dtype="float32")
        print(f"{n:>8}{out.prefill_tokens_per_s:>15.1f}{out.decode_tokens_per_s:>14.2f}"
              f"{p.total_bytes:>14,}{p.growing_bytes:>10,}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
