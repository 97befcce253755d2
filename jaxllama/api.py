"""Public Python API: `from_pretrained` -> `LLM` (config, params, tokenizer), `save_pretrained`.

    llm = jaxllama.from_pretrained(None)          # the embedded SmolLM2-135M-Instruct
    logits = llm(ids)                             # int ids [B T] -> float32 logits [B T V]
    print(llm.generate("What is the capital of France?").text)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.config import ModelConfig
from jaxllama.inference.engine import Engine, GenerationOutput
from jaxllama.inference.sampling import SamplingConfig
from jaxllama.inference.streaming import TextStream
from jaxllama.model import Transformer


@dataclass
class Completion:
    """One generated answer."""

    text: str  # special tokens (the final EOS) removed
    token_ids: list[int]  # generated ids, a final EOS included
    prompt_tokens: int
    finish_reason: str  # "stop" (an EOS id) or "length"
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                    "generated_tokens": len(self.token_ids), "finish_reason": self.finish_reason,
                    "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
                    "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


class LLM:
    """A loaded model. Calling it on int token ids [B T] returns float32 logits [B T V]."""

    def __init__(self, config: ModelConfig, params, tokenizer=None,
                 generation_config: dict | None = None, source: str = ""):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or {})
        self.source = source
        self._engines: dict = {}

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
                 on_text: Callable[[int, str], None] | None = None, **engine_options):
        """Generate for one prompt (returns a `Completion`) or several (a list, one batch).

        Prompts are strings (chat template applied when the tokenizer has one, unless
        `chat=False`) or token id lists. `on_text(row, text)` receives text as it is decoded.
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

        out = self.engine(**engine_options).generate(
            ids, max_new_tokens, sampling, seed, self.eos_token_ids, self.pad_token_id, max_len,
            on_token if on_text is not None else None)
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
                decode_tokens_per_s=out.decode_tokens_per_s))
        return result


def from_pretrained(path: str | os.PathLike | None = None, dtype: str = "float32",
                    overrides: Sequence[str] = ()) -> LLM:
    """Load an HF directory, a .gguf file or a jaxllama orbax directory (None = the embedded
    SmolLM2-135M-Instruct). `overrides` are dotted model-config strings, e.g.
    `["model.layer_pattern=lambda"]`."""
    from jaxllama.checkpoint import load_checkpoint

    ck = load_checkpoint(path, dtype, overrides)
    return LLM(ck.config, ck.params, ck.tokenizer, ck.generation_config, ck.source)


def save_pretrained(llm: LLM, out_dir: str | os.PathLike, overwrite: bool = False) -> str:
    """Write `llm` as an HF Llama directory (weights, config, tokenizer, generation config)."""
    from jaxllama.checkpoint import save_hf

    return save_hf(llm.config, llm.params, llm.tokenizer, out_dir, llm.generation_config,
                   overwrite=overwrite)


__all__ = ["LLM", "Completion", "from_pretrained", "save_pretrained"]
