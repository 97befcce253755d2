"""The fused decode copy (`decode_weights(fused=True)`: one q/k/v and one gate/up kernel per block)
computes what the separate kernels compute: prefill and one-token decode logits equal to float32
tolerance for dense and lambda layers (with attention biases), in the unstacked layout CPU decodes
with and in the stacked one, the stored params untouched; and CPU engines decode fused by default
(so the engine's own greedy tests run it). Batch 1 and two layers: compile time is this file's
cost."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama import AttentionConfig, LambdaConfig, ModelConfig, init_cache, init_params
from jaxllama.inference.decode import DecodeLayout, decode_caches, decode_weights
from jaxllama.inference.engine import Engine, engine_defaults

# tiny programs: little optimisation, older emitters (as tests/kernels/kernel_test_base.py does)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def compile_fast(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)

CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                  layer_pattern=("dense", "lambda"), max_position_embeddings=64,
                  attention=AttentionConfig(num_heads=4, num_kv_heads=2, bias=True),
                  lambda_=LambdaConfig(global_tokens=2, window=4),
                  tie_word_embeddings=True)


@pytest.fixture(scope="module")
def params():
    """Random params of the model's shapes (eval_shape: nothing compiled). Sharper than the init
    default, so greedy choices are not near-ties; biases and norm scales not 0 / 1."""
    shapes = jax.eval_shape(functools.partial(init_params, CFG), jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: jnp.asarray(
        rng.standard_normal(a.shape, np.float32) * (0.3 if len(a.shape) >= 2 else 0.1)
        + (0.0 if len(a.shape) >= 2 else 1.0)), shapes)


def prefill_then_step(params, layout: DecodeLayout, fused: bool):
    """Logits of a 7-token prefill [1 7 V] and of the next token [1 1 V], both through `layout`."""
    weights = decode_weights(CFG, params, jnp.float32, layout, fused=fused)
    model = layout.model(CFG)
    tokens = jax.random.randint(jax.random.key(1), (1, 8), 0, CFG.vocab_size)
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    cache = decode_caches(CFG, init_cache(CFG, 1, 16), layout)

    def run(weights, cache):
        first, cache = model.apply({"params": weights}, tokens[:, :7], pos[:, :7], cache)
        step, _ = model.apply({"params": weights}, tokens[:, 7:], pos[:, 7:], cache)
        return first, step

    return weights, compile_fast(run, weights, cache)(weights, cache)


@pytest.mark.parametrize("unstacked", [True, False], ids=["unstacked", "stacked"])
def test_fused_logits_equal_unfused(params, unstacked):
    layout = DecodeLayout(unstacked=unstacked, separate_head=True)
    _, want = prefill_then_step(params, layout, fused=False)
    weights, got = prefill_then_step(params, layout, fused=True)
    blocks = ([weights[f"layer_{i}"] for i in range(CFG.num_layers)] if unstacked
              else [weights[f"run_{r}"]["block"] for r in range(len(CFG.runs))])
    for block in blocks:  # the fused kernels are what ran: the separate ones are gone
        assert set(block["mixer"]) == {"qkv_proj", "o_proj"}, sorted(block["mixer"])
        assert set(block["mlp"]) == {"gate_up", "down"}, sorted(block["mlp"])
        assert "bias" in block["mixer"]["qkv_proj"]
    assert "q_proj" in params["run_0"]["block"]["mixer"]  # the stored params are untouched
    for g, w in zip(got, want, strict=True):
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err <= 1e-5, err


def test_cpu_engine_decodes_fused():
    """CPU engines decode from the fused copy (so every engine test on CPU, e.g. cached greedy ==
    full-forward greedy in test_engine.py, runs it); elsewhere the params are used in place."""
    assert engine_defaults("cpu", "float32", False).fused_decode
    assert not engine_defaults("gpu", "float32", False).fused_decode
    cfg = CFG.replace(layer_pattern=("dense",))
    assert Engine(cfg, {}, platform="cpu").fused
    assert not Engine(cfg, {}, platform="cpu", fused=False).fused
    assert not Engine(cfg, {}, platform="cpu", unstacked=False, separate_head=False).fused
