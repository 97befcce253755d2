"""Parity with the LM-Infinite reference code (tests/fixtures/lm-infinite-tiny: its own outputs on a
tiny random Llama, G=4, L=16, D=16; see /work/shared/fixtures/lm-infinite-tiny/README.md)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.checkpoint import load_checkpoint
from jaxllama.config import AttentionConfig, LambdaConfig, ModelConfig
from jaxllama.mixers.lambda_attention import LambdaAttention, LambdaAttentionConfig, LambdaCache
from jaxllama.model import Transformer, init_cache

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "lm-infinite-tiny"
OVERRIDES = ["model.layer_pattern=lambda", "model.lambda.global_tokens=4",
             "model.lambda.window=16", "model.lambda.distance=16"]


def load(name):
    return np.load(FIXTURE / f"{name}.npy")


@pytest.fixture(scope="module")
def checkpoint():
    ck = load_checkpoint(str(FIXTURE), overrides=OVERRIDES)
    assert ck.config.layer_pattern == ("lambda",) * 3
    return ck


def test_logits(checkpoint):
    model = Transformer(checkpoint.config)
    logits, _ = jax.jit(model.apply)({"params": checkpoint.params}, jnp.asarray(load("input_ids")))
    np.testing.assert_allclose(np.asarray(logits), load("logits"), atol=1e-4, rtol=0)


def test_greedy_decode_prefill_60_then_16_steps(checkpoint):
    cfg, params = checkpoint.config, checkpoint.params
    step = jax.jit(Transformer(cfg).apply)
    prompt = jnp.asarray(load("gen_prompt_ids"))
    cache = init_cache(cfg, 1, 80)
    logits, cache = step({"params": params}, prompt, jnp.arange(60)[None], cache)
    step_logits, ids = [logits[:, -1]], [int(jnp.argmax(logits[0, -1]))]
    for t in range(60, 75):
        logits, cache = step({"params": params}, jnp.array([[ids[-1]]]), jnp.array([[t]]), cache)
        step_logits.append(logits[:, -1])
        ids.append(int(jnp.argmax(logits[0, -1])))
    assert ids == load("gen_generated_ids")[0].tolist()
    np.testing.assert_allclose(np.stack(step_logits, 1), load("gen_step_logits"), atol=1e-4, rtol=0)
    assert int(cache[0].length[0]) == 75 and cache[0].ring_k.shape[2] == 16  # 75 > 16 + 4 kept


def core_module():
    """A lambda layer whose projections are identities onto q | k | v: the module then computes
    exactly the reference's core (RoPE, lambda scores, softmax, values) on given q, k, v."""
    mcfg = ModelConfig(vocab_size=8, hidden_size=192, intermediate_size=8, layer_pattern=("lambda",),
                       max_position_embeddings=64,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16),
                       lambda_=LambdaConfig(global_tokens=4, window=16, distance=16))
    eye = np.eye(192, dtype=np.float32)
    params = {"q_proj": {"kernel": eye[:, :64].reshape(192, 4, 16)},
              "k_proj": {"kernel": eye[:, 64:128].reshape(192, 4, 16)},
              "v_proj": {"kernel": eye[:, 128:].reshape(192, 4, 16)},
              "o_proj": {"kernel": eye[:64].reshape(4, 16, 192)}}
    return LambdaAttentionConfig.from_model(mcfg), params


def heads_to_x(*arrays):
    """[1 N T H] arrays -> one [1 T N*H*len] input."""
    return jnp.asarray(np.concatenate([np.transpose(a, (0, 2, 1, 3)).reshape(
        a.shape[0], a.shape[2], -1) for a in arrays], -1))


@pytest.mark.parametrize("case", ["long", "exact", "short"])
def test_attention_core(case):
    cfg, params = core_module()
    q, k, v, out = (load(f"attn_core_{case}_{n}") for n in ("q", "k", "v", "out"))
    t = q.shape[2]
    y, _ = jax.jit(LambdaAttention(cfg).apply)({"params": params}, heads_to_x(q, k, v),
                                                jnp.arange(t)[None])
    np.testing.assert_allclose(np.asarray(y)[..., :64], heads_to_x(out), atol=1e-5, rtol=0)


def test_attention_core_single_query_decode():
    cfg, params = core_module()
    q, k, v, out = (load(f"attn_core_decode_{n}") for n in ("q", "k", "v", "out"))
    apply = jax.jit(LambdaAttention(cfg).apply)
    cache = LambdaCache.init(cfg, 1, 0, jnp.float32)
    # keys/values 0..38 through the cache (the queries of that prefill are irrelevant), then the
    # single query at position 39 with its own key/value 39
    _, cache = apply({"params": params}, heads_to_x(k[:, :, :39], k[:, :, :39], v[:, :, :39]),
                     jnp.arange(39)[None], cache)
    y, cache = apply({"params": params}, heads_to_x(q, k[:, :, 39:], v[:, :, 39:]),
                     jnp.array([[39]]), cache)
    np.testing.assert_allclose(np.asarray(y)[..., :64], heads_to_x(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["long", "exact", "short"])
def test_layer0_attention_module(checkpoint, case):
    cfg = checkpoint.config
    layer0 = jax.tree.map(lambda a: a[0], checkpoint.params["run_0"]["block"]["mixer"])
    hidden, out = load(f"attn_layer0_{case}_hidden"), load(f"attn_layer0_{case}_out")
    t = hidden.shape[1]
    y, _ = jax.jit(LambdaAttention(LambdaAttentionConfig.from_model(cfg)).apply)(
        {"params": layer0}, jnp.asarray(hidden), jnp.arange(t)[None])
    np.testing.assert_allclose(np.asarray(y), out, atol=1e-5, rtol=0)
