"""Generation benchmark: jaxllama against transformers on SmolLM2-135M-Instruct (embedded GGUF).

For each dtype (float32, bfloat16), in one process, both warmed up:
  - decode: greedy, the same chat prompt, exactly `--new-tokens` tokens (EOS ignored);
    tokens/s over the decode loop, the first token (which comes from the prefill) excluded:
    jaxllama's on-device loop time, transformers' `generate(n)` minus `generate(1)`;
  - prefill: one `--prefill-tokens` prompt (random ids); jaxllama's prefill call, transformers'
    forward with the KV cache and `logits_to_keep=1` (what its `generate` runs first).
Timings are the best of `--repeats` runs. Prints a markdown table with the ratios.

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
    args = p.parse_args()

    from jaxllama.checkpoint import load_checkpoint

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
    print("\ncompute dtypes: " + "; ".join(
        f"{d}: jaxllama {o['compute']}" + (f", transformers {t['compute']}" if t else "")
        for d, o, t in rows))


if __name__ == "__main__":
    main()
