"""Public Python API: `from_pretrained` -> `LLM` (config, params, tokenizer), `save_pretrained`.

    llm = jaxllama.from_pretrained(None)          # the embedded SmolLM2-135M-Instruct
    logits = llm(ids)                             # int ids [B T] -> float32 logits [B T V]
    print(llm.generate("What is the capital of France?").text)

Start-up. `from_pretrained` and `LLM.generate` say what they are doing in one short line each on
stderr (loading the checkpoint, building the tokenizer, compiling for a new prompt shape; only for
steps still running after 0.3 s) when stderr is a terminal, or always with `verbose=True`
(`verbose=False`: never). `from_pretrained` turns on XLA's persistent compilation cache (as
the CLIs do), so a new Python process reuses the prefill and decode programs compiled by earlier
ones instead of compiling them again: by default in `$JAXLLAMA_CACHE/xla` (~/.cache/jaxllama/xla),
elsewhere with `JAXLLAMA_COMPILE_CACHE=/path`, off with `JAXLLAMA_COMPILE_CACHE=` (empty) or
`compile_cache=False`; a cache directory already set in JAX's own config is left as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.config import ModelConfig
from jaxllama.inference.engine import Engine, GenerationOutput
from jaxllama.inference.sampling import SamplingConfig
from jaxllama.inference.streaming import TextStream
from jaxllama.model import Transformer

log = logging.getLogger(__name__)


def compile_cache_dir() -> str | None:
    """Where compiled programs are kept: `$JAXLLAMA_COMPILE_CACHE` when set (empty = no cache),
    else `xla/` under jaxllama's cache directory (`$JAXLLAMA_CACHE`, default ~/.cache/jaxllama)."""
    if "JAXLLAMA_COMPILE_CACHE" in os.environ:
        return os.environ["JAXLLAMA_COMPILE_CACHE"].strip() or None
    from jaxllama.checkpoint.gguf import cache_root

    return str(cache_root() / "xla")


def enable_compile_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on XLA's persistent compilation cache in `path` (default `compile_cache_dir()`) for
    programs that take over a second to compile; returns the directory in use. A directory already
    configured in JAX (`JAX_COMPILATION_CACHE_DIR`, `jax_compilation_cache_dir`) wins."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = os.fspath(path) if path is not None else compile_cache_dir()
    if not path:
        return None
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    compilation_cache.reset_cache()  # a cache checked (and found unset) earlier is looked up again
    return path


@contextlib.contextmanager
def _deferred(message: str | None, *args):
    """Log `message` if the block is still running after 0.3 s: slow steps (compiling, reading
    weights) get their status line, input refused at once gets only its one-line error. Yields
    a function that cancels the line (called when the step's result starts to arrive)."""
    note = None if message is None else threading.Timer(0.3, log.info, (message, *args))
    if note is not None:
        note.start()
    try:
        yield note.cancel if note is not None else (lambda: None)
    finally:
        if note is not None:
            note.cancel()


@contextlib.contextmanager
def _status(verbose: bool):
    """While active, jaxllama's INFO log lines (one per step of loading or compiling) are written
    to stderr as `[jaxllama] ...`, and nowhere else."""
    if not verbose:
        yield
        return
    logger = logging.getLogger("jaxllama")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[jaxllama] %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@dataclass
class Completion:
    """One generated answer."""

    text: str  # special tokens (the final EOS) removed
    token_ids: list[int]  # generated ids, a final EOS included
    prompt_tokens: int
    finish_reason: str  # "stop" (an EOS id) or "length"
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    draft_acceptance: float | None = None  # speculative decoding: draft tokens kept / proposed

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                    "generated_tokens": len(self.token_ids), "finish_reason": self.finish_reason,
                    "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
                    "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


class LLM:
    """A loaded model. Calling it on int token ids [B T] returns float32 logits [B T V]."""

    def __init__(self, config: ModelConfig, params, tokenizer=None,
                 generation_config: dict | None = None, source: str = "", verbose: bool = False):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or {})
        self.source = source
        self.verbose = verbose  # status lines on stderr (compiling for a new shape)
        self._engines: dict = {}
        self._shapes_seen: set = set()

    def __repr__(self) -> str:
        return (f"LLM(source={self.source!r}, layers={self.config.num_layers}, "
                f"hidden={self.config.hidden_size}, dtype={self.config.param_dtype})")

    @cached_property
    def _forward(self):
        model = Transformer(self.config)
        return jax.jit(lambda params, ids: model.apply({"params": params}, ids)[0])

    def __call__(self, ids) -> jax.Array:
        ids = jnp.asarray(ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"expected integer token ids [B T], got {ids.dtype} {ids.shape}")
        return self._forward(self.params, ids.astype(jnp.int32))

    def engine(self, **options) -> Engine:
        """The generation engine (one per option set; see `Engine` for the options)."""
        key = tuple(sorted(options.items()))
        if key not in self._engines:
            self._engines[key] = Engine(self.config, self.params, **options)
        return self._engines[key]

    # ------------------------------------------------------------------------ text

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.generation_config.get("eos_token_ids") or []
        if not ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids = [self.tokenizer.eos_token_id]
        return [int(i) for i in ids]

    @property
    def pad_token_id(self) -> int:
        pad = self.generation_config.get("pad_token_id")
        if pad is None:
            pad = (self.eos_token_ids or [0])[0]
        return int(pad)

    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids of `prompt`, through the chat template when the tokenizer has one (unless
        `chat=False`); `system` adds a system message."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids instead of text")
        if chat is None:
            chat = self.has_chat_template()
        if chat:
            if not self.has_chat_template():
                raise ValueError("the tokenizer has no chat template (use chat=False / --no-chat)")
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if system:
            raise ValueError("a system message needs the chat template (drop --no-chat)")
        return list(self.tokenizer(prompt)["input_ids"])

    # ------------------------------------------------------------------------ generation

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]] | np.ndarray,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, chat: bool | None = None,
                 system: str | None = None, max_len: int | None = None,
                 on_text: Callable[[int, str], None] | None = None, draft=None,
                 **engine_options):
        """Generate for one prompt (returns a `Completion`) or several (a list, one batch).

        Prompts are strings (chat template applied when the tokenizer has one, unless
        `chat=False`) or token id lists. `on_text(row, text)` receives text as it is decoded.
        `draft`: speculative decoding (`jaxllama.inference.speculative`: an `NgramDraft` or a
        `ModelDraft`), same output when greedy, same distribution when sampling.
        """
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        ids = [self.encode(p, chat, system) if isinstance(p, str) else [int(t) for t in p]
               for p in batch]
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        streams = [TextStream(self.tokenizer) for _ in ids] if on_text is not None else None

        def on_token(step, tokens, active):
            for row, (tok, act) in enumerate(zip(tokens, active)):
                if act:
                    text = streams[row].push(int(tok))
                    if text:
                        on_text(row, text)

        # a new batch size, prompt-length bucket or sampling kind compiles new programs
        longest = max((len(p) for p in ids), default=0)
        shape = (tuple(sorted(engine_options.items())), len(ids), 1 << max(longest - 1, 0)
                 .bit_length(), max_new_tokens, max_len, sampling.static(self.config.vocab_size),
                 None if draft is None else draft.key)
        message = None if shape in self._shapes_seen else (
            "compiling for %d prompt(s) of up to %d tokens (or reading the compile cache)")
        with _status(self.verbose), _deferred(message, len(ids), longest) as compiled:
            def first_token(*a):  # programs are ready once a token is out: no late line
                compiled()
                on_token(*a)

            out = self.engine(**engine_options).generate(
                ids, max_new_tokens, sampling, seed, self.eos_token_ids, self.pad_token_id,
                max_len, first_token if on_text is not None else None, draft=draft)
        self._shapes_seen.add(shape)
        if streams is not None:
            for row, s in enumerate(streams):
                rest = s.flush()
                if rest:
                    on_text(row, rest)
        done = self._completions(out)
        return done[0] if single else done

    def _completions(self, out: GenerationOutput) -> list[Completion]:
        result = []
        for b in range(out.tokens.shape[0]):
            row = out.row(b)
            text = self.tokenizer.decode(row, skip_special_tokens=True) if self.tokenizer else ""
            result.append(Completion(
                text=text, token_ids=row, prompt_tokens=int(out.prompt_lengths[b]),
                finish_reason="stop" if out.stopped[b] else "length",
                prefill_tokens_per_s=out.prefill_tokens_per_s,
                decode_tokens_per_s=out.decode_tokens_per_s,
                draft_acceptance=out.acceptance_rate if out.draft_tokens else None))
        return result


def from_pretrained(path: str | os.PathLike | None = None, dtype: str = "float32",
                    overrides: Sequence[str] = (), *, verbose: bool | None = None,
                    compile_cache: bool = True) -> LLM:
    """Load an HF directory, a .gguf file or a jaxllama orbax directory (None = the embedded
    SmolLM2-135M-Instruct). `overrides` are dotted model-config strings, e.g.
    `["model.layer_pattern=lambda"]`. `verbose`: status lines on stderr (None: when stderr is a
    terminal; see the module docstring); `compile_cache`: turn on the persistent compilation
    cache."""
    from jaxllama.checkpoint import (
        checkpoint_format,
        default_checkpoint,
        load_checkpoint,
        resolve_checkpoint,
    )

    if compile_cache:
        enable_compile_cache()
    if verbose is None:
        verbose = sys.stderr.isatty()
    with _status(verbose):
        path = default_checkpoint() if path is None else resolve_checkpoint(path)  # Hub ids too
        fmt = checkpoint_format(path)
        # GGUF loads say what they do themselves (dequantizing, or reading the cache); other
        # formats get one line when loading takes a while
        name = Path(path).name
        with _deferred(None if fmt == "gguf" else "loading %s (%s)", name, dtype):
            ck = load_checkpoint(path, dtype, overrides)
    return LLM(ck.config, ck.params, ck.tokenizer, ck.generation_config, ck.source,
               verbose=verbose)


def save_pretrained(llm: LLM, out_dir: str | os.PathLike, overwrite: bool = False) -> str:
    """Write `llm` as an HF Llama directory (weights, config, tokenizer, generation config)."""
    from jaxllama.checkpoint import save_hf

    return save_hf(llm.config, llm.params, llm.tokenizer, out_dir, llm.generation_config,
                   overwrite=overwrite)


__all__ = ["LLM", "Completion", "compile_cache_dir", "enable_compile_cache", "from_pretrained",
           "save_pretrained"]
