"""Token sampling: greedy, temperature, top-k and top-p (nucleus), one row per batch entry.

Order of operations (the usual one, as in transformers' logits warpers): divide by the temperature,
keep the `top_k` largest logits, then keep the smallest set of the most probable survivors whose
probability mass reaches `top_p` (the most probable token always survives). Temperature 0 is
greedy argmax.

`SamplingConfig` splits into static parts (greedy, top_k, whether top-p is on: they change the
traced program) and dynamic parts (temperature, top_p values: arrays, so changing them does not
recompile the decode loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names the parameter."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise SamplingError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def static(self, vocab_size: int) -> tuple[bool, int, bool]:
        """(greedy, top_k, use_top_p): the parts that shape the compiled program."""
        top_k = self.top_k if 0 < self.top_k < vocab_size else 0
        return self.greedy, (0 if self.greedy else top_k), (not self.greedy and self.top_p < 1)

    def dynamic(self) -> tuple[jax.Array, jax.Array]:
        """(temperature, top_p) as float32 scalars (traced: no recompilation when they change)."""
        return (jnp.asarray(max(self.temperature, 1e-6), jnp.float32),
                jnp.asarray(self.top_p, jnp.float32))


def nucleus_mask(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep-mask over logits sorted in descending order [B C]: a token survives when the mass of
    the tokens strictly more probable than it is below `top_p` (so the first always survives)."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return mass_before < top_p


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
           greedy: bool, top_k: int, use_top_p: bool) -> jax.Array:
    """Next tokens [B] int32 from float32 logits [B V]; rows draw independently from `key`."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k == 0 and not use_top_p:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    # Candidates in descending order: the top-k (cheap partial selection) or, for top-p alone,
    # the whole vocabulary sorted.
    k = top_k if top_k else logits.shape[-1]
    cand, idx = jax.lax.top_k(logits, k)  # [B C], [B C]
    if use_top_p:
        cand = jnp.where(nucleus_mask(cand, top_p), cand, -jnp.inf)
    choice = jax.random.categorical(key, cand, axis=-1)  # [B]
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


__all__ = ["SamplingConfig", "SamplingError", "nucleus_mask", "sample"]
