"""FoT layers (`fot`, `fot_local`) beyond the reference fixture: the prompt split, a fresh
prompt's short last prefix window going to memory, decode eviction, the memory overflow error,
`mem_attention_grouping` changing nothing, the engine's whole-prompt prefill and the cache plan.
Tiny model: window W = 4, tail L = 3, GQA (4 query heads, 2 kv heads)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.checkpoint import load_checkpoint
from jaxllama.config import AttentionConfig, FoTConfig, ModelConfig
from jaxllama.inference.engine import Engine
from jaxllama.inference.sampling import SamplingConfig
from jaxllama.kvcache import plan
from jaxllama.mixers import spec_of
from jaxllama.mixers.fot_attention import check_memory
from jaxllama.model import Transformer, init_cache, init_params, layer_locations, unstack

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "longllama-tiny"
W, L, T = 4, 3, 12  # T - L = 9 prefix tokens: windows 4, 4, 1; the last (1) + L fits W
MAX_LEN = T + 3  # memory: 15 slots


def tiny(**fot) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                       layer_pattern=("fot_local", "fot"), max_position_embeddings=W,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                       fot=FoTConfig(last_context_length=L, mem_dtype="float32", **fot))


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """`init_params`' tree filled on the host: no init program to compile (on XLA:CPU that costs
    more than all of this file's forwards). Norm scales 1 + 0.1 N(0, 1), embeddings N(0, 1), other
    weights N(0, 1) / sqrt(fan-in)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), seq_len=1))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, x = jax.tree_util.keystr(path), rng.standard_normal(leaf.shape, np.float32)
        if "norm" in name:
            return jnp.asarray(1 + 0.1 * x)
        fan_in = cfg.intermediate_size if "down" in name else cfg.hidden_size
        return jnp.asarray(x if "embed" in name else x / np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def model():
    cfg = tiny()
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 64)
    return cfg, random_params(cfg, 0), tokens, jax.jit(Transformer(cfg).apply)


def lengths(cfg: ModelConfig, cache, layer: int) -> tuple[int, int]:
    """(local length, memory length) of `layer` in a model cache, read on the host (no eager
    slicing ops to compile per step)."""
    r, j = layer_locations(cfg)[layer]
    return int(np.asarray(cache[r].length)[j]), int(np.asarray(cache[r].mem_length)[j])


def test_prompt_split_is_the_references():
    cfg = spec_of("fot").config(ModelConfig(
        layer_pattern=("fot",), max_position_embeddings=32,
        attention=AttentionConfig(num_heads=4, num_kv_heads=4),
        fot=FoTConfig(last_context_length=16)))
    assert cfg.pieces(100) == [(0, 32, True), (32, 32, True), (64, 20, True), (84, 16, False)]
    assert cfg.pieces(30) == [(0, 14, True), (14, 16, False)]
    assert cfg.pieces(16) == [(0, 16, False)]
    assert cfg.pieces(1) == [(0, 1, False)]


def test_forward_without_cache_is_one_cached_call(model):
    """No cache: the layer windows the input itself, as one call on a fresh cache does. A fresh
    prompt's last prefix window (1 token) moves to memory although it and the tail (3) fit W."""
    cfg, params, tokens, apply = model
    positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)
    full, _ = apply({"params": params}, tokens)
    cached, cache = apply({"params": params}, tokens, positions, init_cache(cfg, 2, MAX_LEN))
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=0)
    local, mem = unstack(cfg, cache)
    assert int(local.length) == int(mem.length) == L
    assert int(mem.mem_length) == T - L and local.mem_k.shape[1] == 0
    np.testing.assert_array_equal(np.asarray(mem.positions[:, :L]), np.asarray(positions[:, -L:]))
    # the last window alone (no memory) differs: memory is read
    alone, _ = apply({"params": params}, tokens[:, -L:])
    assert np.abs(np.asarray(alone) - np.asarray(full[:, -L:])).max() > 1e-3


def test_mem_attention_grouping_changes_nothing(model):
    """The reference's (heads, queries) loop split: the traced program is the same, op for op."""
    cfg, params, tokens, apply = model
    grouped = cfg.replace(fot=dataclasses.replace(cfg.fot, mem_attention_grouping=(1, 2)))
    assert grouped != cfg
    # `apply` has traced this call already (test_forward_without_cache_is_one_cached_call)
    text = [f.lower({"params": params}, tokens).as_text()
            for f in (apply, jax.jit(Transformer(grouped).apply))]
    assert text[0] == text[1]


def decode(model, max_len, steps):
    """The prompt in one call, then `steps` one-token steps: (logits per step, local and memory
    lengths of the memory layer after each step, final cache)."""
    cfg, params, tokens, apply = model
    cache = init_cache(cfg, 2, max_len)
    logits, cache = apply({"params": params}, tokens, jnp.broadcast_to(jnp.arange(T), (2, T)),
                          cache)
    out, seen = [np.asarray(logits)[:, -1]], []  # host-side: no eager ops to compile per step
    for t in range(steps):
        tok = jnp.asarray(np.argmax(out[-1], -1)[:, None], jnp.int32)
        logits, cache = apply({"params": params}, tok, np.full((2, 1), T + t, np.int32), cache)
        out.append(np.asarray(logits)[:, -1])
        seen.append(lengths(cfg, cache, 1))
    return out, seen, cache


def test_decode_eviction_then_memory_overflow(model):
    """Local 3 -> 4 (full); the next step moves all 4 into memory before its attention and keeps
    only itself. Four steps later a second eviction needs 13 + 4 of the 15 memory slots: that
    step's logits are NaN and `check_memory` names the sizes."""
    out, seen, cache = decode(model, MAX_LEN, 6)
    assert seen == [(4, 9), (1, 13), (2, 13), (3, 13), (4, 13), (1, 17)]
    assert np.isfinite(np.stack(out[:6])).all()
    assert np.isnan(out[6]).all()
    with pytest.raises(ValueError, match=r"fot: memory overflow: 17 entries for a memory of 15"):
        check_memory(cache)


def test_a_call_longer_than_the_cache_is_refused(model):
    cfg, params, tokens, _ = model
    with pytest.raises(ValueError, match=r"fot: a piece of 3 tokens does not fit the local "
                                         r"cache of 2 entries"):  # raised while tracing
        jax.eval_shape(Transformer(cfg).apply, {"params": params}, tokens[:, :3],
                       jnp.zeros((2, 3), jnp.int32), init_cache(cfg, 2, 2))


def test_engine_generates_the_references_greedy_ids():
    """The engine feeds the prompt whole (the mixer's `prefill_chunk`), unpadded, then decodes
    with the same eviction: the reference's greedy continuation exactly."""
    ck = load_checkpoint(str(FIXTURE))
    prompt = np.load(FIXTURE / "gen_prompt_ids.npy")[0].tolist()
    want = np.load(FIXTURE / "gen_generated_ids.npy")[0].tolist()
    engine = Engine(ck.config, ck.params, prefill_chunk=16)
    assert engine.chunk_for(len(prompt)) == len(prompt)
    out = engine.generate([prompt], max_new_tokens=len(want), sampling=SamplingConfig())
    assert out.row(0) == want


def test_cache_plan_memory_grows_and_the_window_does_not():
    raw = json.loads((FIXTURE / "config.json").read_text())
    cfg = load_checkpoint(str(FIXTURE)).config
    p = plan(cfg, 4096)
    kinds = {k.kind: k for k in p.kinds}
    assert kinds["fot"].layers == len(raw["mem_layers"])
    assert kinds["fot_local"].kv_growing == 0 and kinds["fot_local"].kv_constant > 0
    assert kinds["fot"].kv_growing > 0 and kinds["fot"].kv_constant > 0
    # memory: k and v of M = 4096 slots, [B M K H] float32, per memory layer
    h = raw["hidden_size"] // raw["num_attention_heads"]
    assert kinds["fot"].kv_growing == len(raw["mem_layers"]) * 2 * 4096 * raw[
        "num_attention_heads"] * h * 4


def test_top_k_memory_read_is_exact_when_k_covers_the_memory(model):
    """`mem_top_k` 9 reads the 9 written slots of a 15-slot memory through the top-k path: the
    exact result; `mem_top_k` 2 drops memory slots: finite, and different."""
    cfg, params, tokens, apply = model
    positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)
    exact, _ = apply({"params": params}, tokens, positions, init_cache(cfg, 2, MAX_LEN))
    got = {}
    for k in (T - L, 2):
        c = cfg.replace(fot=dataclasses.replace(cfg.fot, mem_top_k=k))
        got[k], _ = jax.jit(Transformer(c).apply)({"params": params}, tokens, positions,
                                                  init_cache(c, 2, MAX_LEN))
    np.testing.assert_allclose(np.asarray(got[T - L]), np.asarray(exact), atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(got[2])).all()
    assert np.abs(np.asarray(got[2]) - np.asarray(exact)).max() > 1e-4
