"""Mamba2 layers as configuration of Zebra-Llama's variant, against the reference's own numbers
(tests/fixtures/zebra-tiny-layer1: decoder layer 1 of the zebra-tiny fixture, x and B at GQA
width repeated over the heads after the conv, headdim = d_state, gated RMSNorm per head with
eps 1e-5), in a training pass (three chunks of 16) and through the cache (chunked prefill, then
one-token steps); and the knobs transformers has no form for (norm before the gate, D per
channel, a norm group size of its own, a dt ceiling) against a float64 NumPy loop."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from jaxllama.block import Block
from jaxllama.config import Mamba2Config, ModelConfig
from jaxllama.mixers import spec_of

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "zebra-tiny-layer1"
ZEBRA = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=160,
                    layer_pattern=("mamba2",), rms_norm_eps=1e-5, max_position_embeddings=256,
                    mamba2=Mamba2Config(num_heads=4, head_dim=16, state_size=16, n_groups=4,
                                        xb_heads=2, chunk_size=16, norm_eps=1e-5))


def zebra_params():
    """Block params of layer 1 from the reference's tensor names (`model.layers.1.mamba.*` for
    the mixer, Llama names for the norms and MLP)."""
    raw = load_file(str(FIXTURE / "layer1.safetensors"))
    spec = spec_of("mamba2")
    params: dict = {}

    def put(path, value):
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value)

    for t in spec.hf_tensors(spec.config(ZEBRA)):
        a = raw[f"model.layers.1.{t.hf_name.replace('mixer.', 'mamba.', 1)}"]
        put(t.path, (a.T if t.transpose else a).reshape(t.shape))
    put(("mixer_norm", "scale"), raw["model.layers.1.input_layernorm.weight"])
    put(("mlp_norm", "scale"), raw["model.layers.1.post_attention_layernorm.weight"])
    for ours, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        put(("mlp", ours, "kernel"), raw[f"model.layers.1.mlp.{hf}.weight"].T)
    return params


def test_zebra_layer_matches_the_reference():
    h_in, h_out = np.load(FIXTURE / "hidden_states_1_2.npy")  # [1 48 64] each
    block = Block(ZEBRA, "mamba2")
    params = zebra_params()
    pos = jnp.arange(48)[None]
    want = jax.eval_shape(lambda: block.init(jax.random.key(0), h_in, pos))["params"]
    assert jax.tree.structure(nn.meta.unbox(want)) == jax.tree.structure(params)
    apply = jax.jit(lambda x, cache: block.apply({"params": params}, x, pos[:, :x.shape[1]],
                                                 cache))
    full, _ = apply(h_in, None)
    np.testing.assert_allclose(np.asarray(full), h_out, atol=1e-4, rtol=0)
    spec = spec_of("mamba2")
    cache = spec.cache.init(spec.config(ZEBRA), 1, 0, jnp.float32)
    outs = []
    for at, n in ((0, 20), (20, 20), *((40 + i, 1) for i in range(8))):
        y, cache = apply(h_in[:, at:at + n], cache)
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), h_out, atol=1e-4, rtol=0)
    assert cache.ssm.shape == (1, 4, 16, 16) and cache.conv.shape == (1, 3, 128)


def silu(v):
    return v / (1 + np.exp(-v))


def mamba2_numpy(p, x, sub):
    """The Mamba2 mixer on one row x [T D], float64 (no segments)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    m, e, h = sub.mamba2, sub.inner_size, sub.num_heads
    hp, n, g, w = m.head_dim, m.state_size, m.n_groups, m.conv_kernel
    proj = x @ p["in_proj"]["kernel"]
    z, xbc, dt = proj[:, :e], proj[:, e:e + sub.conv_channels], proj[:, e + sub.conv_channels:]
    pad = np.concatenate([np.zeros((w - 1, xbc.shape[1])), xbc])
    conv = sum(p["conv1d"]["kernel"][j] * pad[j:j + len(x)] for j in range(w))
    xbc = silu(conv + p["conv1d"]["bias"])
    xs, bm, cm = xbc[:, :e], xbc[:, e:e + g * n], xbc[:, e + g * n:]
    dt = np.clip(np.log1p(np.exp(dt + p["dt_bias"])), *m.time_step_limit)
    a = -np.exp(p["A_log"])
    group = np.arange(h) // (h // g)
    d = p["D"].reshape(h, -1)
    state, ys = np.zeros((h, hp, n)), []
    for t in range(len(x)):
        xt, bt, ct = xs[t].reshape(h, hp), bm[t].reshape(g, n)[group], cm[t].reshape(g, n)[group]
        state = (np.exp(dt[t] * a)[:, None, None] * state
                 + dt[t][:, None, None] * xt[:, :, None] * bt[:, None, :])
        ys.append(((state * ct[:, None, :]).sum(-1) + d * xt).reshape(e))
    y = np.stack(ys)
    gs = sub.norm_group_size
    grouped = y.reshape(len(x), e // gs, gs)
    y = (grouped / np.sqrt((grouped ** 2).mean(-1, keepdims=True) + sub.norm_eps)).reshape(y.shape)
    y = y * silu(z) * p["norm"]["scale"]  # norm_before_gate
    return y @ p["out_proj"]["kernel"]


def test_knobs_outside_transformers_match_a_numpy_loop():
    knobs = Mamba2Config(head_dim=8, state_size=4, n_groups=2, chunk_size=4,
                         norm_before_gate=True, d_per_channel=True, norm_group_size=4,
                         norm_eps=1e-3, time_step_limit=(0.05, 0.5))
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=0,
                      layer_pattern=("mamba2",), mamba2=knobs)
    spec = spec_of("mamba2")
    sub = spec.config(cfg)
    module = spec.module(cfg=sub)
    x = jax.random.normal(jax.random.key(5), (1, 10, 16))
    pos = jnp.zeros((1, 10), jnp.int32)
    params = nn.meta.unbox(module.init(jax.random.key(6), x, pos)["params"])
    params = jax.tree_util.tree_map_with_path(  # every parameter away from its init value
        lambda path, a: a + 0.3 * jax.random.normal(jax.random.key(len(str(path))), a.shape),
        params)
    assert params["D"].shape == (sub.num_heads, 8)
    y, _ = jax.jit(module.apply)({"params": params}, x, pos)
    np.testing.assert_allclose(np.asarray(y[0]), mamba2_numpy(params, np.asarray(x[0], np.float64),
                                                               sub), rtol=1e-5, atol=1e-5)
