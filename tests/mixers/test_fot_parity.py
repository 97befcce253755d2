"""Parity with the LongLLaMA reference code's own outputs (`FIXTURE`: a tiny random-weight
LongLLaMA, its config.json, weights and golden arrays; semantics in its README.md).

Everything is read from `FIXTURE` (sizes, memory layers, window, tail length, lengths per decode
step from fixture_manifest.json), so the file runs unchanged against any fixture set of this
format.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.checkpoint import load_checkpoint
from jaxllama.model import Transformer, init_cache, layer_locations, unstack

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "longllama-tiny"
ATOL = 1e-4  # the README's bar for a float32 reimplementation (max |logit| ~ 9)


def load(name, root=FIXTURE):
    return np.load(root / f"{name}.npy")


@pytest.fixture(scope="module")
def raw_config():
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURE / "fixture_manifest.json").read_text())


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(str(FIXTURE))


@pytest.fixture(scope="module")
def forward(checkpoint):
    """The whole input as one call on a fresh cache: (logits [1 N V], per-layer caches)."""
    cfg, params = checkpoint.config, checkpoint.params
    ids = jnp.asarray(load("input_ids"), jnp.int32)
    n = ids.shape[1]
    positions = jnp.arange(n, dtype=jnp.int32)[None]
    logits, cache = jax.jit(Transformer(cfg).apply)({"params": params}, ids, positions,
                                                    init_cache(cfg, 1, n))
    return logits, unstack(cfg, cache)


def test_config_reads_the_fot_fields(checkpoint, raw_config):
    cfg = checkpoint.config
    assert cfg.num_layers == raw_config["num_hidden_layers"]
    assert [i for i, k in enumerate(cfg.layer_pattern) if k == "fot"] == raw_config["mem_layers"]
    assert cfg.max_position_embeddings == raw_config["max_position_embeddings"]
    assert cfg.fot.last_context_length == raw_config["last_context_length"]
    assert cfg.fot.mem_positionals == raw_config["mem_positionals"]
    assert cfg.attention.num_kv_heads == cfg.attention.num_heads == raw_config[
        "num_attention_heads"]


def test_windowed_forward_logits(forward):
    np.testing.assert_allclose(np.asarray(forward[0]), load("logits"), atol=ATOL, rtol=0)


def test_memory_after_the_forward(forward, raw_config):
    """Memory of each memory layer (in `mem_layers` order): keys rotated as if at position 0,
    values, in token order; nothing else written."""
    _, layers = forward
    keys, values = load("forward_mem_keys"), load("forward_mem_values")  # [Lm B N M H]
    assert keys.shape[0] == len(raw_config["mem_layers"])
    for j, layer in enumerate(raw_config["mem_layers"]):
        c = layers[layer]
        m = int(c.mem_length)
        assert m == keys.shape[3]
        got_k = np.transpose(np.asarray(c.mem_k[:, :m], np.float32), (0, 2, 1, 3))
        got_v = np.transpose(np.asarray(c.mem_v[:, :m], np.float32), (0, 2, 1, 3))
        np.testing.assert_allclose(got_k, keys[j], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got_v, values[j], atol=ATOL, rtol=0)


def test_local_cache_after_the_forward(forward, raw_config):
    """Every layer's local cache: un-rotated keys, values and absolute positions of the tail."""
    _, layers = forward
    keys, values = load("forward_local_keys"), load("forward_local_values")  # [L B N S H]
    positions = load("forward_local_position_ids")  # [L B 1 S 1]
    assert len(layers) == keys.shape[0] == raw_config["num_hidden_layers"]
    for layer, c in enumerate(layers):
        s = int(c.length)
        assert s == keys.shape[3]
        np.testing.assert_allclose(np.transpose(np.asarray(c.k[:, :s]), (0, 2, 1, 3)),
                                   keys[layer], atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.transpose(np.asarray(c.v[:, :s]), (0, 2, 1, 3)),
                                   values[layer], atol=ATOL, rtol=0)
        np.testing.assert_array_equal(np.asarray(c.positions[:, :s]), positions[layer, :, 0, :, 0])
        if layer not in raw_config["mem_layers"]:
            assert c.mem_k.shape[1] == 0  # no memory at all outside the memory layers


def test_mem_positionals_false_logits():
    root = FIXTURE / "mem_positionals_false"
    ck = load_checkpoint(str(root))
    assert ck.config.fot.mem_positionals is False
    logits, _ = jax.jit(Transformer(ck.config).apply)({"params": ck.params},
                                                      jnp.asarray(load("input_ids")))
    np.testing.assert_allclose(np.asarray(logits), load("logits", root), atol=ATOL, rtol=0)


def test_greedy_generation_ids_and_step_logits(checkpoint, manifest, raw_config):
    """Step 0 is the prompt's windowed forward; step t feeds the previous id at the next position.
    When the local cache is full the whole of it moves to memory (memory layers) or is dropped,
    before that step's attention: local and memory lengths after every step match the
    reference's, the eviction step included."""
    cfg, params = checkpoint.config, checkpoint.params
    prompt = jnp.asarray(load("gen_prompt_ids"), jnp.int32)
    want_ids, want_logits = load("gen_generated_ids"), load("gen_step_logits")
    n, steps = prompt.shape[1], want_ids.shape[1]
    step = jax.jit(Transformer(cfg).apply)
    cache = init_cache(cfg, 1, n + steps)
    logits, cache = step({"params": params}, prompt, jnp.arange(n, dtype=jnp.int32)[None], cache)
    mem = raw_config["mem_layers"][0]
    where = layer_locations(cfg)  # lengths are read on the host: no eager slicing per step

    def lengths():
        (r0, j0), (rm, jm) = where[0], where[mem]
        return int(np.asarray(cache[r0].length)[j0]), int(np.asarray(cache[rm].mem_length)[jm])

    got_logits = [np.asarray(logits)[0, -1]]
    ids = [int(np.argmax(got_logits[-1]))]
    local_len, mem_len = [], []
    for t in range(1, steps):
        a, b = lengths()
        local_len.append(a)
        mem_len.append(b)
        logits, cache = step({"params": params}, jnp.array([[ids[-1]]], jnp.int32),
                             jnp.array([[n - 1 + t]], jnp.int32), cache)
        got_logits.append(np.asarray(logits)[0, -1])
        ids.append(int(np.argmax(got_logits[-1])))
    a, b = lengths()
    local_len.append(a)
    mem_len.append(b)
    assert ids == want_ids[0].tolist()
    np.testing.assert_allclose(np.stack(got_logits), want_logits[0], atol=ATOL, rtol=0)
    assert local_len == manifest["gen_local_cache_len_after_each_step"]
    assert mem_len == manifest["gen_mem_cache_len_after_each_step_layer1"]
    assert max(local_len) == cfg.max_position_embeddings  # the eviction step was reached
