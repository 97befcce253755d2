"""Mamba1 layers against a float64 NumPy loop written from METHODS section 9 (grouped B and C),
and, for both selective-scan kinds (`mamba`, `mamba2`): packed rows equal their segments run
alone (training pass and cache, a boundary inside a chunk and one at a chunk start), and the SSM
state stays float32 under a bfloat16 compute dtype. (Prefill + decode == full forward and left
padding are the contract test's.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.config import Mamba2Config, MambaConfig, ModelConfig
from jaxllama.mixers import spec_of

D = 32
TINY = {"mamba": {"mamba": MambaConfig(state_size=4, n_groups=2)},
        "mamba2": {"mamba2": Mamba2Config(head_dim=8, state_size=4, n_groups=2, chunk_size=4)}}


def layer(kind, dtype=jnp.float32):
    """(spec, sub-config, module, params) of one tiny mixer of `kind`."""
    spec = spec_of(kind)
    cfg = ModelConfig(vocab_size=64, hidden_size=D, intermediate_size=0, layer_pattern=(kind,),
                      **TINY[kind])
    sub = spec.config(cfg)
    module = spec.module(cfg=sub, dtype=dtype)
    x = jnp.zeros((1, 8, D))
    params = nn.meta.unbox(module.init(jax.random.key(1), x, jnp.zeros((1, 8), jnp.int32))["params"])
    # random (not init-valued) dt bias and D so that every term of the scan shows
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (a + 0.3 * jax.random.normal(jax.random.key(len(path)), a.shape)
                         if path[-1].key in ("D", "bias", "dt_bias") else a), params)
    return spec, sub, module, params


def silu(v):
    return v / (1 + np.exp(-v))


def softplus(v):
    return np.log1p(np.exp(v))


def mamba1_numpy(p, x, cfg):
    """The Mamba1 mixer on one row x [T D], float64, channel e reading group e // (E / G)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    m, e, r = cfg.mamba, cfg.inner_size, cfg.dt_rank
    g, n, w = m.n_groups, m.state_size, m.conv_kernel
    xz = np.einsum("td,dke->tke", x, p["in_proj"]["kernel"])
    xs, z = xz[:, 0], xz[:, 1]
    pad = np.concatenate([np.zeros((w - 1, e)), xs])
    conv = sum(p["conv1d"]["kernel"][j] * pad[j:j + len(x)] for j in range(w)) + p["conv1d"]["bias"]
    u = silu(conv)
    proj = u @ p["x_proj"]["kernel"]
    dt_low, bm, cm = proj[:, :r], proj[:, r:r + g * n], proj[:, r + g * n:]
    delta = softplus(dt_low @ p["dt_proj"]["kernel"] + p["dt_proj"]["bias"])
    a = -np.exp(p["A_log"])
    group = np.arange(e) // (e // g)
    h, ys = np.zeros((e, n)), []
    for t in range(len(x)):
        bt, ct = bm[t].reshape(g, n)[group], cm[t].reshape(g, n)[group]
        h = np.exp(delta[t][:, None] * a) * h + (delta[t] * u[t])[:, None] * bt
        ys.append((h * ct).sum(-1) + p["D"] * u[t])
    return (np.stack(ys) * silu(z)) @ p["out_proj"]["kernel"]


def test_mamba1_with_grouped_b_c_matches_a_numpy_loop():
    _, sub, module, params = layer("mamba")
    x = jax.random.normal(jax.random.key(2), (2, 11, D))
    y, _ = jax.jit(module.apply)({"params": params}, x, jnp.zeros((2, 11), jnp.int32))
    for row in range(2):
        want = mamba1_numpy(params, np.asarray(x[row], np.float64), sub)
        np.testing.assert_allclose(np.asarray(y[row]), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def mixer(kind):
    spec, sub, module, params = layer(kind)
    apply = jax.jit(lambda x, cache, seg: module.apply({"params": params}, x,
                                                        jnp.zeros(x.shape[:2], jnp.int32), cache,
                                                        seg))
    return spec, sub, apply


def test_packed_row_equals_its_segments_alone(mixer):
    """Row [a (6 tokens) | b (6 tokens)] with ids 1 and 2: each segment's outputs equal the
    segment run alone, in a training pass and through the cache in chunks (4, 2, 4, 1, 1): the
    boundary falls at the start of the third chunk, so the cached state and conv window must
    not carry into b."""
    spec, sub, apply = mixer
    x = jax.random.normal(jax.random.key(3), (1, 12, D))
    seg = jnp.array([[1] * 6 + [2] * 6], jnp.int32)
    alone, _ = apply(jnp.concatenate([x[:, :6], x[:, 6:]]), None, None)  # [2 6 D]
    packed, _ = apply(x, None, seg)
    for got in (packed, run_cached(spec, sub, apply, x, seg, [4, 2, 4, 1, 1])):
        np.testing.assert_allclose(np.asarray(got[0, :6]), np.asarray(alone[0]), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[0, 6:]), np.asarray(alone[1]), rtol=1e-5,
                                   atol=1e-5)
    # a boundary inside a chunk of the cache path: (4, 4, 4) puts it at index 2 of chunk 2
    got = run_cached(spec, sub, apply, x, seg, [4, 4, 4])
    np.testing.assert_allclose(np.asarray(got[0, 6:]), np.asarray(alone[1]), rtol=1e-5, atol=1e-5)


def run_cached(spec, sub, apply, x, seg, chunks, dtype=jnp.float32):
    cache = spec.cache.init(sub, x.shape[0], 0, dtype)
    out, at = [], 0
    for n in chunks:
        y, cache = apply(x[:, at:at + n], cache, seg[:, at:at + n])
        out.append(y)
        at += n
    return jnp.concatenate(out, axis=1)


def test_state_is_float32_under_bfloat16_compute(kind):
    """bfloat16 compute and cache: the conv window is bfloat16, the SSM state float32, and the
    outputs follow the float32 layer (to bfloat16 rounding)."""
    spec, sub, module, params = layer(kind, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(4), (1, 6, D))
    cache = spec.cache.init(sub, 1, 0, jnp.bfloat16)
    pos = jnp.zeros((1, 6), jnp.int32)
    apply = jax.jit(lambda x, pos, cache: module.apply({"params": params}, x, pos, cache))
    y, cache = apply(x.astype(jnp.bfloat16), pos, cache)
    assert cache.ssm.dtype == jnp.float32 and cache.conv.dtype == jnp.bfloat16
    y1, cache = apply(x[:, :1].astype(jnp.bfloat16), pos[:, :1], cache)
    assert cache.ssm.dtype == jnp.float32 and y.dtype == y1.dtype == jnp.bfloat16
    _, _, module32, _ = layer(kind)
    want, _ = jax.jit(module32.apply)({"params": params}, x, pos)
    err = np.abs(np.asarray(y, np.float32) - np.asarray(want)).max()
    assert err < 0.05 * np.abs(np.asarray(want)).max(), err
