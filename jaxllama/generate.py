"""`python -m jaxllama.generate`: generate text from a checkpoint (default: the embedded SmolLM2).

    python -m jaxllama.generate --prompt "What is the capital of France?"
    python -m jaxllama.generate --prompt "a" --prompt "b" --json --temperature 0.7 --top-p 0.9
    python -m jaxllama.generate --prompt-file long.txt --no-chat --layer-pattern lambda
    python -m jaxllama.generate --prompt "Repeat: a b c d" --draft ngram --draft-tokens 6

One prompt streams its answer token by token to stdout; several run as one padded batch and print
when done. `--json` prints one JSON object per prompt instead. The statistics line goes to stderr,
and so do status lines (loading, building the tokenizer, compiling: one each, for steps that take
a while) when stderr is a terminal and `--json` is not given, or with `--verbose`. Compiled programs are kept in XLA's persistent cache (see
`jaxllama.api.compile_cache_dir`), the dequantized embedded model in jaxllama's cache, so a second
start is much faster than the first.

`--draft` decodes speculatively: `ngram` (prompt lookup, no second model) or a checkpoint of a
smaller model with the same tokenizer. Greedy output is the same token for token, sampled output
the same in distribution; the statistics line adds the draft's acceptance rate.

`--dtype` is the weight dtype. On accelerators it is also the compute dtype. On CPU decode always
computes in float32 (XLA:CPU's bfloat16 matrix-vector products are about 25x slower), from a
float32 copy of the weights; prefill computes in bfloat16 only on CPUs with bfloat16 units
(AVX512_BF16 / AMX), else in float32. So on a CPU without bfloat16 units (AVX2 only) `--dtype
bfloat16` gains nothing: the bfloat16 weights are kept for prefill next to the float32 decode copy,
and each prefill converts them all to float32 first, which makes it slower and, for the duration
of that call, adds a float32 copy, so the peak memory is above float32's even though the steady
state is below it (figures: BENCHMARKS.md). Use it there only to check bfloat16 numerics. See
`jaxllama.inference.engine` for the per-phase choices.

Bad input (a flag value, an unreadable checkpoint, a prompt longer than the context) exits with a
one-line error on stderr: status 2 for flags, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from jaxllama.cli import CliParser, memory_tokens_arg, model_overrides

DTYPES = ("float32", "bfloat16")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _number(kind, lo=None, hi=None, lo_open=False, name=""):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text}")
        return value
    parse.__name__ = name or kind.__name__
    return parse


def _prompt_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise argparse.ArgumentTypeError(f"cannot read {path}: {reason}") from None


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m jaxllama.generate", description=__doc__.split("\n")[0])
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", dest="prompt", type=_prompt_file,
                   metavar="PATH", help="read a prompt from a UTF-8 text file, e.g. a long "
                   "document (repeatable, mixes with --prompt in order)")
    p.add_argument("--checkpoint", default=None,
                   help="HF directory, .gguf file or orbax directory (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weight dtype. CPU decode computes in float32 from a float32 copy, and "
                   "prefill in bfloat16 only on CPUs with bfloat16 units: on other CPUs "
                   "bfloat16 prefills slower and peaks higher in memory than float32 (see the "
                   "module docstring)")
    p.add_argument("--max-new-tokens", type=_number(int, 1, name="max-new-tokens"), default=256)
    p.add_argument("--max-len", type=_number(int, 2, name="max-len"), default=None,
                   help="cap on prompt + generated tokens (default: the model's context)")
    p.add_argument("--temperature", type=_number(float, 0, name="temperature"), default=0.0,
                   help="0 = greedy")
    p.add_argument("--top-k", type=_number(int, 0, name="top-k"), default=0, help="0 = off")
    p.add_argument("--top-p", type=_number(float, 0, 1, lo_open=True, name="top-p"), default=1.0,
                   help="nucleus mass in (0, 1]; 1 = off")
    p.add_argument("--seed", type=_number(int, 0, name="seed"), default=0)
    p.add_argument("--no-chat", action="store_true", help="raw text, no chat template")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument("--layer-pattern", default=None,
                   help="override model.layer_pattern, e.g. lambda or dense*4,lambda*26")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. model.lambda.window=64 (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    p.add_argument("--verbose", action="store_true",
                   help="status lines on stderr even with --json or when stderr is not a terminal")
    p.add_argument("--draft", default=None, metavar="CHECKPOINT|ngram",
                   help="speculative decoding: 'ngram' (prompt lookup) or a smaller model's "
                   "checkpoint sharing the tokenizer (same output when greedy)")
    p.add_argument("--draft-tokens", type=_number(int, 1, name="draft-tokens"), default=4,
                   help="draft tokens proposed per round (with --draft)")
    p.add_argument("--memory-tokens", default=None, metavar="E:M", type=memory_tokens_arg,
                   help="M memory tokens after every E ordinary tokens (CBHybrid), e.g. 256:8")
    p.add_argument("--memory-token", default="<|memory|>",
                   help="the memory token (added to the tokenizer and embedding when absent)")
    return p


def _overrides(args) -> list[str]:
    try:
        return model_overrides(args.override, args.layer_pattern)
    except ValueError as e:
        raise CliError(str(e)) from None


def run(args) -> int:
    from jaxllama.api import from_pretrained
    from jaxllama.checkpoint import CheckpointError
    from jaxllama.config import ConfigError
    from jaxllama.inference.engine import GenerationError
    from jaxllama.inference.sampling import SamplingError

    # status lines for a person at a terminal; --verbose forces them (--json, pipes, logs)
    verbose = args.verbose or (not args.json and sys.stderr.isatty())
    try:
        llm = from_pretrained(args.checkpoint, args.dtype, _overrides(args), verbose=verbose)
    except (CheckpointError, ConfigError, OSError) as e:
        raise CliError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if llm.tokenizer is None:
        raise CliError(f"{llm.source}: the checkpoint has no tokenizer")
    if verbose and args.dtype == "bfloat16" and _cpu_without_bfloat16_units():
        print("[jaxllama] note: this CPU has no bfloat16 units: bfloat16 weights save no memory "
              "here and prefill slower than float32 (see --help)", file=sys.stderr)
    chat = False if args.no_chat else llm.has_chat_template()
    if args.system and not chat:
        raise CliError("--system needs a chat template (the tokenizer has none, or --no-chat)")
    stream = len(args.prompt) == 1 and not args.json

    def on_text(row, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.memory_tokens is not None:
        if args.draft is not None:
            raise CliError("--draft and --memory-tokens cannot be combined")
        return _run_with_memory_tokens(args, llm, chat, on_text if stream else None)
    draft = _draft(args, llm, verbose)

    try:
        out = llm.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, chat=chat, system=args.system, max_len=args.max_len,
                           on_text=on_text if stream else None, draft=draft)
    except (GenerationError, SamplingError, ValueError) as e:
        raise CliError(str(e).splitlines()[0]) from None
    for i, c in enumerate(out):
        if args.json:
            print(json.dumps(dict(prompt=args.prompt[i], **c.to_json()), ensure_ascii=False))
        elif stream:
            print()
        else:
            print(f"--- [{i}] {args.prompt[i]}\n{c.text}")
    sys.stdout.flush()
    _stats(len(out), sum(c.prompt_tokens for c in out), sum(len(c.token_ids) for c in out),
           out[-1])
    return 0


def _draft(args, llm, verbose: bool):
    """The `--draft` object: an NgramDraft, a ModelDraft of a checkpoint, or None."""
    from jaxllama.api import from_pretrained
    from jaxllama.checkpoint import CheckpointError
    from jaxllama.config import ConfigError
    from jaxllama.inference.speculative import DraftError, ModelDraft, NgramDraft

    if args.draft is None:
        return None
    if args.draft == "ngram":
        return NgramDraft(tokens=args.draft_tokens)
    try:
        small = from_pretrained(args.draft, args.dtype, verbose=verbose)
    except (CheckpointError, ConfigError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CliError(f"--draft {args.draft}: {msg}") from None
    if small.config.vocab_size != llm.config.vocab_size:
        raise CliError(f"--draft {args.draft}: its vocabulary ({small.config.vocab_size} tokens) "
                       f"differs from the model's ({llm.config.vocab_size}); a draft must share "
                       "the tokenizer")
    try:
        return ModelDraft(small.config, small.params, tokens=args.draft_tokens)
    except DraftError as e:
        raise CliError(str(e)) from None


def _cpu_without_bfloat16_units() -> bool:
    import jax

    from jaxllama.inference.engine import cpu_has_bfloat16_units

    return jax.default_backend() == "cpu" and not cpu_has_bfloat16_units()


def _stats(prompts: int, prompt_tokens: int, generated: int, last) -> None:
    """The statistics line on stderr: all prompts' tokens; the rates of `last`, a Completion of
    the last batch run (one batch for plain generation, the last round with memory tokens)."""
    draft = ("" if getattr(last, "draft_acceptance", None) is None
             else f", draft acceptance {100 * last.draft_acceptance:.0f}%")
    print(f"[jaxllama] {prompts} prompt(s), {prompt_tokens} prompt tokens, {generated} "
          f"generated: prefill {last.prefill_tokens_per_s:.1f} tok/s, decode "
          f"{last.decode_tokens_per_s:.1f} tok/s per sequence{draft}", file=sys.stderr)


def _run_with_memory_tokens(args, llm, chat: bool, on_text) -> int:
    """Prompts one at a time, memory tokens inserted in the prompt and between generated
    episodes (see `jaxllama.memory_tokens.generate_with_memory_tokens`)."""
    from jaxllama.api import LLM
    from jaxllama.memory_tokens import ensure_memory_token, generate_with_memory_tokens

    episode, per_episode = args.memory_tokens
    mid, params, cfg = ensure_memory_token(llm.tokenizer, llm.params, llm.config,
                                           args.memory_token)
    llm = LLM(cfg, params, llm.tokenizer, llm.generation_config, llm.source, verbose=llm.verbose)

    rounds = []

    def continue_ids(ids, n):
        rounds.append(llm.generate([ids], max_new_tokens=n, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed + len(ids),
                                   max_len=args.max_len, on_text=on_text)[0])
        return rounds[-1].token_ids

    prompt_tokens = generated = 0
    for prompt in args.prompt:
        ids = llm.encode(prompt, chat, args.system)
        prompt_tokens += len(ids)
        new = generate_with_memory_tokens(continue_ids, ids, args.max_new_tokens, episode,
                                          per_episode, mid, llm.eos_token_ids)
        text = llm.tokenizer.decode(new, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": new,
                              "memory_token_id": mid}, ensure_ascii=False))
        elif on_text is not None:
            print()
        else:
            print(f"--- {prompt}\n{text}")
        generated += len(new)
    sys.stdout.flush()
    _stats(len(args.prompt), prompt_tokens, generated, rounds[-1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("one of --prompt or --prompt-file is required")
    try:
        args.prompt = list(args.prompt)
        if any(not p for p in args.prompt):
            raise CliError("a prompt is empty (--prompt or --prompt-file)")
        return run(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a CLI prints one line, never a traceback
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
