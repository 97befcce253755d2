"""The dense Transformer gives the same logits whichever attention implementation `KernelConfig`
names: a full forward, and chunked prefill + one-token decode through the KV cache (traced query
offsets, cache segment ids), with the Pallas kernels really running (their names in the HLO)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxllama.kernels import _dispatch
from kernel_test_base import compile_fast

from jaxllama.config import AttentionConfig, KernelConfig, ModelConfig
from jaxllama.model import Transformer, init_cache, init_params

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, layer_pattern=("dense",) * 2,
                  attention=AttentionConfig(num_heads=4, num_kv_heads=1, head_dim=16))
B, T = 2, 19


def _with(impl: str) -> ModelConfig:
    return CFG.replace(kernels=KernelConfig(attention=impl))


@pytest.fixture(scope="module")
def params_and_tokens():
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    return params, tokens


@pytest.fixture(scope="module")
def xla_logits(params_and_tokens):
    logits, compiled = _full_logits("xla", *params_and_tokens)
    assert not _dispatch.kernels_in(compiled)
    return logits


def _full_logits(impl: str, params, tokens):
    fn = lambda p, x: Transformer(_with(impl)).apply({"params": p}, x)[0]
    with _dispatch.emulate_tpu():
        compiled = compile_fast(fn, params, tokens)
        return compiled(params, tokens), compiled


def _prefill_then_decode(impl: str, params, tokens, prefill: int):
    """Logits [B T V] from a prefill of `prefill` tokens, then one token per step."""
    model = Transformer(_with(impl))

    def step(p, x, positions, cache):
        return model.apply({"params": p}, x, positions, cache)

    cache = init_cache(CFG, B, 32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    prefill_fn = compile_fast(step, params, tokens[:, :prefill], pos[:, :prefill], cache)
    logits, cache = prefill_fn(params, tokens[:, :prefill], pos[:, :prefill], cache)
    decode_fn = compile_fast(step, params, tokens[:, :1], pos[:, :1], cache)
    out = [logits]
    for t in range(prefill, T):
        logits, cache = decode_fn(params, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
        out.append(logits)
    return jnp.concatenate(out, axis=1), decode_fn


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("impl,kernel", [("pallas_interpret", "jaxllama_flash_fwd_gpu"),
                                         ("pallas_tpu", "jaxllama_flash_fwd_tpu")])
def test_full_forward_logits_match_xla(params_and_tokens, xla_logits, impl, kernel):
    got, compiled = _full_logits(impl, *params_and_tokens)
    _dispatch.assert_kernel_ran(kernel, compiled)
    assert _rel(got, xla_logits) < 1e-5, _rel(got, xla_logits)


def test_cached_decode_logits_match_xla(params_and_tokens, xla_logits):
    params, tokens = params_and_tokens
    want = xla_logits
    xla, _ = _prefill_then_decode("xla", params, tokens, prefill=16)
    got, decode_fn = _prefill_then_decode("pallas_interpret", params, tokens, prefill=16)
    _dispatch.assert_kernel_ran("jaxllama_flash_fwd_gpu", decode_fn)  # decode runs the kernel
    assert _rel(xla, want) < 1e-5, _rel(xla, want)
    assert _rel(got, want) < 1e-5, _rel(got, want)
