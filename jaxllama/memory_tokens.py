"""Memory tokens of the Cerebras CBHybrid recipe (METHODS section 6).

After every `episode_length` ordinary tokens, `num_memory_tokens_per_episode` copies of one memory
token id are inserted (none after the last chunk). They take ordinary positions and are excluded
from the loss; in sparse (lambda) layers they let a window carry a summary of what it has seen.

Everything here works on 1-D Python lists, 1-D arrays and [B T] arrays (numpy or jax), and returns
the same kind of container it was given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

DEFAULT_MEMORY_TOKEN = "<|memory|>"


def _check_episode(episode_length: int, num_memory_tokens: int) -> None:
    if not isinstance(episode_length, (int, np.integer)) or episode_length <= 0:
        raise ValueError(f"episode_length must be a positive integer, got {episode_length!r}")
    if not isinstance(num_memory_tokens, (int, np.integer)) or num_memory_tokens < 0:
        raise ValueError(f"num_memory_tokens_per_episode must be >= 0, got {num_memory_tokens!r}")


def _as_array(ids) -> tuple[np.ndarray, Any]:
    """ids as a numpy array plus a function that turns a numpy result back into ids' kind."""
    if isinstance(ids, (list, tuple)):
        kind = type(ids)
        return np.asarray(ids, dtype=np.int64).reshape(-1), lambda a: kind(int(x) for x in a)
    if isinstance(ids, np.ndarray):
        return ids, lambda a: a
    if hasattr(ids, "shape"):  # a jax array
        return np.asarray(ids), jnp.asarray
    raise TypeError(f"ids must be a list or an array, got {type(ids).__name__}")


def memory_insert_count(length: int, episode_length: int = 256,
                        num_memory_tokens_per_episode: int = 8) -> int:
    """How many memory tokens `insert_memory_tokens` adds to `length` ordinary tokens."""
    _check_episode(episode_length, num_memory_tokens_per_episode)
    episodes = -(-length // episode_length)  # ceil
    return max(episodes - 1, 0) * num_memory_tokens_per_episode


def insert_memory_tokens(ids, episode_length: int = 256, num_memory_tokens_per_episode: int = 8,
                         memory_token_id: int | None = None):
    """Insert M = `num_memory_tokens_per_episode` copies of `memory_token_id` after every
    `episode_length` tokens of the last axis, except after the last (possibly partial) chunk.

    ids: [T] or [B T]. Returns [T + n] or [B T + n] with n = `memory_insert_count(T, E, M)`.
    """
    if memory_token_id is None:
        raise ValueError("insert_memory_tokens: memory_token_id is required")
    _check_episode(episode_length, num_memory_tokens_per_episode)
    arr, back = _as_array(ids)
    if arr.ndim not in (1, 2):
        raise ValueError(f"ids must be [T] or [B T], got shape {arr.shape}")
    t = arr.shape[-1]
    e, m = episode_length, num_memory_tokens_per_episode
    if memory_insert_count(t, e, m) == 0:
        return back(arr.copy())
    pieces = []
    for start in range(0, t, e):
        pieces.append(arr[..., start:start + e])
        if start + e < t:
            pieces.append(np.full(arr.shape[:-1] + (m,), memory_token_id, arr.dtype))
    return back(np.concatenate(pieces, axis=-1))


def remove_memory_tokens(ids, memory_token_id: int):
    """Inverse of `insert_memory_tokens`: drop every `memory_token_id` from the last axis.

    For [B T] input every row must hold the same number of memory tokens.
    """
    arr, back = _as_array(ids)
    if arr.ndim not in (1, 2):
        raise ValueError(f"ids must be [T] or [B T], got shape {arr.shape}")
    keep = arr != memory_token_id
    if arr.ndim == 1:
        return back(arr[keep])
    counts = keep.sum(axis=-1)
    if np.any(counts != counts[0]):
        raise ValueError("remove_memory_tokens: rows hold different numbers of memory tokens")
    return back(arr[keep].reshape(arr.shape[0], int(counts[0])))


def memory_token_loss_mask(ids, memory_token_id: int):
    """Boolean mask of ids' shape: False at memory tokens (exclude them as loss targets)."""
    if isinstance(ids, (list, tuple)):
        return [int(x) != memory_token_id for x in ids]
    if isinstance(ids, np.ndarray):
        return ids != memory_token_id
    return jnp.asarray(ids) != memory_token_id


def parse_memory_tokens(spec: str) -> tuple[int, int]:
    """`"256:8"` -> (episode_length 256, memory tokens per episode 8); one-line ValueError else."""
    parts = str(spec).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--memory-tokens {spec!r}: expected E:M, e.g. 256:8")
    e, m = int(parts[0]), int(parts[1])
    if e <= 0:
        raise ValueError(f"--memory-tokens {spec!r}: episode length must be > 0")
    return e, m


def generate_with_memory_tokens(generate: Callable[[list[int], int], list[int]],
                                prompt_ids: Sequence[int], max_new_tokens: int,
                                episode_length: int, num_memory_tokens_per_episode: int,
                                memory_token_id: int, eos_ids: Sequence[int] = ()) -> list[int]:
    """Generate while keeping the memory-token layout: before every ordinary token that starts a
    new episode, M memory tokens are fed to the model (never emitted).

    `generate(ids, n)` continues the sequence `ids` by at most n tokens and returns them (it may
    stop early at an EOS id). Generation runs in rounds that end at episode boundaries. Returns the
    generated ordinary ids (a final EOS included).
    """
    e, m = episode_length, num_memory_tokens_per_episode
    seq = list(insert_memory_tokens(list(prompt_ids), e, m, memory_token_id))
    count = len(prompt_ids)  # ordinary tokens so far
    out: list[int] = []
    eos = {int(i) for i in eos_ids}
    while len(out) < max_new_tokens:
        if count and count % e == 0 and m:
            seq += [memory_token_id] * m
        new = list(generate(seq, min(e - count % e, max_new_tokens - len(out))))
        out += new
        seq += new
        count += len(new)
        if not new or new[-1] in eos:
            break
    return out


class MemoryToken(NamedTuple):
    token_id: int
    params: Any
    config: Any


def _grow_rows(table, rows: int):
    """Append rows to a [V D] table, initialised to the mean row (a typical, neutral embedding)."""
    new = jnp.broadcast_to(jnp.mean(table.astype(jnp.float32), axis=0, keepdims=True),
                           (rows, table.shape[1])).astype(table.dtype)
    return jnp.concatenate([table, new], axis=0)


def ensure_memory_token(tokenizer, params, config, token: str = DEFAULT_MEMORY_TOKEN
                        ) -> MemoryToken:
    """Make sure `token` exists in the tokenizer and the model's vocabulary.

    Adds it to `tokenizer` as a special token (in place) when absent; if its id is past the
    embedding table, grows `embed/embedding` (and the untied `lm_head/kernel`) with mean rows and
    raises `config.vocab_size`. Returns `MemoryToken(token_id, params, config)`: the new params
    tree and config (unchanged objects when nothing had to grow).
    """
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = int(tokenizer.convert_tokens_to_ids(token))
    if token_id < config.vocab_size:
        return MemoryToken(token_id, params, config)
    grow = token_id + 1 - config.vocab_size
    params = dict(params)
    params["embed"] = dict(params["embed"], embedding=_grow_rows(params["embed"]["embedding"], grow))
    if "lm_head" in params:
        head = params["lm_head"]["kernel"]  # [D V]
        params["lm_head"] = dict(params["lm_head"], kernel=_grow_rows(head.T, grow).T)
    config = dataclasses.replace(config, vocab_size=token_id + 1)
    return MemoryToken(token_id, params, config)


__all__ = ["DEFAULT_MEMORY_TOKEN", "MemoryToken", "ensure_memory_token",
           "generate_with_memory_tokens", "insert_memory_tokens",
           "memory_insert_count", "memory_token_loss_mask", "parse_memory_tokens",
           "remove_memory_tokens"]
