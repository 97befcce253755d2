"""Generation benchmark: jaxllama against transformers on SmolLM2-135M-Instruct (embedded GGUF).

For each dtype (float32, bfloat16), in one process, both warmed up:
  - decode: greedy, the same chat prompt, exactly `--new-tokens` tokens (EOS ignored);
    tokens/s over the decode loop, the first token (which comes from the prefill) excluded:
    jaxllama's on-device loop time, transformers' `generate(n)` minus `generate(1)`;
  - prefill: one `--prefill-tokens` prompt (random ids); jaxllama's prefill call, transformers'
    forward with the KV cache and `logits_to_keep=1` (what its `generate` runs first).
Timings are the best of `--repeats` runs. Prints a markdown table with the ratios.

Also printed: the CPU's model and features and the XLA flags in effect; the machine's float32
matrix-vector bandwidth, measured on the model's own LM-head product ([1 D] x [D V], the decode
layout's float32 head), and decode as a fraction of the limit it implies (bandwidth / float32
weight bytes read per token); speculative decoding rows (float32, greedy; the chat prompt and a
prompt asking to repeat a paragraph, each against plain decode of the same prompt): the n-gram
draft and a truncated-layer copy of the model (its first `--draft-layers` layers with the
model's embedding, final norm and head) as draft model, with tokens/s, acceptance rate and
whether the output equals plain greedy decoding.

    python scripts/bench_generate.py
    python scripts/bench_generate.py --dtypes float32 --repeats 1     # quicker
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np

PROMPT = "Write a long story about a robot who learns to paint."


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def best(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def matvec_bandwidth(engine, repeats: int) -> tuple[float, float]:
    """(GB/s of the float32 LM-head matrix-vector product [1 D] x [D V], float32 weight bytes
    decode reads per token): the head's bytes over its best time per product, and every decode
    weight except the embedding table (a one-row gather)."""
    import jax
    import jax.numpy as jnp

    weights = engine.decode_weights()
    w = weights["lm_head"]["kernel"]
    h = jax.random.normal(jax.random.key(0), (1, w.shape[0]), jnp.float32)
    head = jax.jit(lambda h, w: h @ w)
    head(h, w).block_until_ready()
    n = 50

    def once():
        t0 = time.perf_counter()
        for _ in range(n):
            out = head(h, w)
        out.block_until_ready()
        return (time.perf_counter() - t0) / n

    seconds = best(once, 3 * repeats)
    per_token = sum(a.nbytes for k, v in weights.items() if k != "embed"
                    for a in jax.tree.leaves(v))
    return w.nbytes / seconds / 1e9, per_token


def truncated_draft(ck, layers: int):
    """The first `layers` layers of the checkpoint's model, with its embedding, final norm and
    head: a draft sharing the tokenizer with no training."""
    from jaxllama.model import stack, unstack

    small = ck.config.replace(layer_pattern=ck.config.layer_pattern[:layers])
    rest = {k: v for k, v in ck.params.items() if not k.startswith("run_")}
    return small, stack(small, unstack(ck.config, ck.params)[:layers], rest)


COPY_TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He wiped "
             "the great lens, trimmed the wick and wrote the weather in a leather book. Ships "
             "passed far out at sea, and none of them ever knew his name.")


def bench_speculative(tok, prompt_ids: list[int], new: int, repeats: int, draft_tokens: int,
                      draft_layers: int) -> list[dict]:
    """float32 greedy decode with each draft kind, on the benchmark's chat prompt and on a
    prompt asking to repeat a paragraph (where prompt lookup finds its tokens): tokens/s,
    acceptance, output == plain greedy."""
    from jaxllama.checkpoint import load_checkpoint
    from jaxllama.inference import Engine
    from jaxllama.inference.speculative import ModelDraft, NgramDraft

    ck = load_checkpoint(None, "float32")
    engine = Engine(ck.config, ck.params)
    copy = tok.apply_chat_template(
        [{"role": "user", "content": "Repeat this text exactly: " + COPY_TEXT}], tokenize=False,
        add_generation_prompt=True)
    prompts = [("story", prompt_ids),
               ("repeat", tok(copy, add_special_tokens=False)["input_ids"])]
    drafts = [(f"ngram (k={draft_tokens}, n<=3)", NgramDraft(tokens=draft_tokens)),
              (f"model: first {draft_layers} of {ck.config.num_layers} layers (k={draft_tokens})",
               ModelDraft(*truncated_draft(ck, draft_layers), tokens=draft_tokens))]
    rows = []
    for label, ids in prompts:
        plain = engine.generate([ids], max_new_tokens=new)
        plain_s = min(engine.generate([ids], max_new_tokens=new).decode_seconds
                      for _ in range(repeats))
        for name, draft in drafts:
            out = engine.generate([ids], max_new_tokens=new, draft=draft)  # warm-up
            same = np.array_equal(out.tokens, plain.tokens)
            runs = [engine.generate([ids], max_new_tokens=new, draft=draft)
                    for _ in range(repeats)]
            fastest = min(runs, key=lambda o: o.decode_seconds)
            rows.append({"prompt": label, "draft": name, "decode": fastest.decode_tokens_per_s,
                         "plain": (new - 1) / plain_s, "acceptance": fastest.acceptance_rate,
                         "per_round": (new - 1) / max(fastest.draft_rounds, 1), "same": same})
            print(f"# speculative {rows[-1]}", flush=True)
    return rows


def bench_jaxllama(dtype: str, prompt_ids: list[int], long_ids: list[int], new: int,
                   repeats: int) -> dict:
    from jaxllama.checkpoint import load_checkpoint
    from jaxllama.inference import Engine

    ck = load_checkpoint(None, dtype)
    engine = Engine(ck.config, ck.params)

    def decode():
        out = engine.generate([prompt_ids], max_new_tokens=new)  # no EOS ids: exactly `new`
        assert out.steps == new
        return out.decode_seconds / (new - 1)

    def prefill():
        out = engine.generate([long_ids], max_new_tokens=1)
        return out.prefill_seconds / len(long_ids)

    decode(), prefill()  # warm-up (compiles)
    return {"decode": 1 / best(decode, repeats), "prefill": 1 / best(prefill, repeats),
            "compute": f"prefill {engine.prefill_cfg.dtype}, decode {engine.decode_cfg.dtype}"}


def bench_transformers(dtype: str, prompt_ids: list[int], long_ids: list[int], new: int,
                       repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from jaxllama.checkpoint import default_checkpoint

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    folder, name = os.path.split(default_checkpoint())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 dtype=getattr(torch, dtype)).eval()
    x = torch.tensor([prompt_ids])
    long_x = torch.tensor([long_ids])

    def gen(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False)
        assert out.shape[1] == x.shape[1] + n
        return time.perf_counter() - t0

    def decode():
        return (gen(new) - gen(1)) / (new - 1)

    def prefill():
        t0 = time.perf_counter()
        with torch.no_grad():
            model(long_x, use_cache=True, logits_to_keep=1)
        return (time.perf_counter() - t0) / len(long_ids)

    gen(8)  # warm-up
    with torch.no_grad():
        model(long_x[:, :256], use_cache=True, logits_to_keep=1)
    return {"decode": 1 / best(decode, repeats), "prefill": 1 / best(prefill, repeats),
            "compute": f"{dtype} ({torch.get_num_threads()} threads)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--draft-layers", type=int, default=8)
    p.add_argument("--skip-speculative", action="store_true")
    args = p.parse_args()

    from jaxllama import cpu_flags
    from jaxllama.checkpoint import load_checkpoint
    from jaxllama.inference import Engine

    info = cpu_flags.cpu_info()
    print(f"# CPU: {info.model}; features: {info.summary()}; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r} (chosen by jaxllama: "
          f"{' '.join(cpu_flags.select(info)) or 'none'})", flush=True)

    tok = load_checkpoint(None).tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    long_ids = np.random.RandomState(0).randint(0, 49152, args.prefill_tokens).tolist()

    rows = []
    for dtype in args.dtypes.split(","):
        ours = bench_jaxllama(dtype, prompt_ids, long_ids, args.new_tokens, args.repeats)
        theirs = (None if args.skip_transformers else
                  bench_transformers(dtype, prompt_ids, long_ids, args.new_tokens, args.repeats))
        rows.append((dtype, ours, theirs))
        print(f"# {dtype}: jaxllama {ours}, transformers {theirs}", flush=True)
    ck = load_checkpoint(None, "float32")
    gbs, per_token = matvec_bandwidth(Engine(ck.config, ck.params), args.repeats)
    del ck
    limit = gbs * 1e9 / per_token
    spec = [] if args.skip_speculative else bench_speculative(
        tok, prompt_ids, args.new_tokens, args.repeats, args.draft_tokens, args.draft_layers)

    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF dequantized), {cpu_name()}, {os.cpu_count()} cores, "
          f"{datetime.date.today()}; decode {args.new_tokens} greedy tokens after a "
          f"{len(prompt_ids)}-token prompt; prefill {args.prefill_tokens} tokens; best of "
          f"{args.repeats}.\n")
    print("| dtype | phase | jaxllama tok/s | transformers tok/s | jaxllama / transformers |")
    print("|---|---|---:|---:|---:|")
    for dtype, ours, theirs in rows:
        for phase in ("prefill", "decode"):
            t = theirs[phase] if theirs else float("nan")
            print(f"| {dtype} | {phase} | {ours[phase]:.1f} | {t:.1f} | {ours[phase] / t:.2f} |")
    if all(t for _, _, t in rows):
        for phase in ("prefill", "decode"):
            b_ours = max(o[phase] for _, o, _ in rows)
            b_theirs = max(t[phase] for _, _, t in rows)
            print(f"\nbest {phase}: jaxllama {b_ours:.1f} tok/s vs transformers {b_theirs:.1f} "
                  f"tok/s = {b_ours / b_theirs:.2f}x", end="")
        print()
    best_decode = max(o["decode"] for _, o, _ in rows)
    print(f"\nCPU features: {info.summary()}. float32 matrix-vector bandwidth (LM head "
          f"[1 D] x [D V]): {gbs:.1f} GB/s; decode reads {per_token / 1e6:.0f} MB of float32 "
          f"weights per token, so the limit is {limit:.1f} tok/s; best decode "
          f"{best_decode:.1f} tok/s = {100 * best_decode / limit:.0f}% of it.")
    if spec:
        print("\n| prompt | draft (float32, greedy) | decode tok/s | plain decode tok/s | "
              "ratio | acceptance | tokens per round | output == plain greedy |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for r in spec:
            print(f"| {r['prompt']} | {r['draft']} | {r['decode']:.1f} | {r['plain']:.1f} | "
                  f"{r['decode'] / r['plain']:.2f} | {100 * r['acceptance']:.0f}% | "
                  f"{r['per_round']:.2f} | {'yes' if r['same'] else 'no'} |")
    print("\ncompute dtypes: " + "; ".join(
        f"{d}: jaxllama {o['compute']}" + (f", transformers {t['compute']}" if t else "")
        for d, o, t in rows))


if __name__ == "__main__":
    main()
