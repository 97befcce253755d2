"""MLA (`mla` kind): absorbed decode == expanded attention, interleaved RoPE, the softmax scale
under yarn, cached decode through the model == its full forward (prepared absorbed weights
included), and the cache planner's L + R values per token per layer."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.config import MLAConfig, ModelConfig, RopeConfig
from jaxllama.inference.decode import DecodeLayout, decode_weights
from jaxllama.kvcache import plan
from jaxllama.layers.rope import apply_rope_interleaved, rope_cos_sin
from jaxllama.mixers import spec_of
from jaxllama.mixers.mla_attention import MLACache, MLAttention, MLAttentionConfig
from jaxllama.model import Transformer, init_cache, init_params

YARN = RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                  mscale_all_dim=1.0)
VARIANTS = {
    # DeepSeek: kv_b per query head, direct query projection, yarn with mscale_all_dim
    "deepseek": MLAConfig(num_heads=4, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=6, rope=YARN),
    # Zebra-Llama: q latent without its norm, GQA-width kv_b, yarn without mscale_all_dim
    "zebra": MLAConfig(num_heads=4, num_kv_heads=2, q_lora_rank=16, q_a_layernorm=False,
                       kv_a_layernorm=False, kv_lora_rank=12, qk_nope_head_dim=8,
                       qk_rope_head_dim=4, v_head_dim=6,
                       rope=RopeConfig(type="yarn", factor=4.0,
                                       original_max_position_embeddings=16)),
}
D, S = 32, 10


def layer(name):
    return MLAttentionConfig(D, 64, VARIANTS[name])


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def built(request):
    cfg = layer(request.param)
    module = MLAttention(cfg)
    x = jax.random.normal(jax.random.key(0), (2, S, D))
    pos = jnp.broadcast_to(jnp.arange(S), (2, S))
    params = randomized(nn.meta.unbox(module.init(jax.random.key(1), x, pos)["params"]))
    return cfg, module, params, x, pos


def randomized(params, seed=7):
    """Every leaf redrawn at scale 0.3 (norm scales included), so outputs are O(1) and a 1e-5
    tolerance means something."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, a.shape, a.dtype)
                                     for k, a in zip(keys, leaves, strict=True)])


def test_absorbed_equals_expanded(built):
    """One-token decode in the absorbed form against the expanded form (`mla.decode`), same
    params, over a cache prefilled with S - 1 tokens (row 0 left-padded), to 1e-5."""
    cfg, module, params, x, pos = built
    seg = jnp.ones((2, S), jnp.int32).at[0, :3].set(0)
    expanded = MLAttention(dataclasses.replace(cfg, mla=dataclasses.replace(cfg.mla,
                                                                            decode="expanded")))
    cache = MLACache.init(cfg, 2, S, jnp.float32)
    _, cache = module.apply({"params": params}, x[:, :-1], pos[:, :-1], cache, seg[:, :-1])
    last = (x[:, -1:], pos[:, -1:], cache, seg[:, -1:])
    a, ca = module.apply({"params": params}, *last)
    e, ce = expanded.apply({"params": params}, *last)
    assert float(jnp.max(jnp.abs(e))) > 0.3
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ca.latent), np.asarray(ce.latent))
    # and both equal the training pass at the last position
    full, _ = module.apply({"params": params}, x, pos, None, seg)
    np.testing.assert_allclose(np.asarray(a[:, 0]), np.asarray(full[:, -1]), rtol=1e-5,
                               atol=1e-5)


def test_prepared_absorbed_weights_are_read(built):
    """`decode_params` adds W_UK / W_UV once; the decode step reads them (a changed W_UV changes
    the output) and, unchanged, they give what slicing kv_b gives."""
    cfg, module, params, x, pos = built
    prepared = spec_of("mla").decode_params(cfg, params)
    assert prepared["absorbed"]["w_uk"].shape == (cfg.num_kv_heads, cfg.nope, cfg.latent)
    assert prepared["absorbed"]["w_uv"].shape == (cfg.num_kv_heads, cfg.latent, cfg.v_dim)
    cache = MLACache.init(cfg, 2, S, jnp.float32)

    @jax.jit
    def decode(p):
        def body(c, t):
            y, c = module.apply({"params": p}, jax.lax.dynamic_slice_in_dim(x, t, 1, 1),
                                jax.lax.dynamic_slice_in_dim(pos, t, 1, 1), c)
            return c, y
        return jax.lax.scan(body, cache, jnp.arange(S))[1]

    plain, ready = decode(params), decode(prepared)
    np.testing.assert_allclose(np.asarray(ready), np.asarray(plain), rtol=1e-5, atol=1e-5)
    broken = {**prepared, "absorbed": {**prepared["absorbed"],
                                       "w_uv": prepared["absorbed"]["w_uv"] * 2}}
    assert float(jnp.max(jnp.abs(decode(broken) - plain))) > 1e-3


def test_interleaved_rope_is_the_complex_product():
    """(x[2i] + i x[2i+1]) e^{i p theta_i}, as DeepSeek-V2 computes it with complex numbers."""
    r = 8
    x = np.asarray(jax.random.normal(jax.random.key(3), (1, 5, 2, r)), np.float64)
    inv = 1.0 / (10000.0 ** (np.arange(0, r, 2) / r))
    pos = np.arange(5)
    cos, sin = rope_cos_sin(jnp.asarray(pos)[None], inv, 1.5)
    got = apply_rope_interleaved(jnp.asarray(x, jnp.float32), cos, sin)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * (1.5 * np.exp(1j * pos[:, None] * inv))[None, :, None]
    want = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_softmax_scale_and_mscale_conventions():
    """DeepSeek (mscale_all_dim): the scale gains mscale(factor, mscale_all_dim)^2. Zebra-Llama
    (no mscale_all_dim): the scale is (H + R) ** -0.5; mscale multiplies cos and sin instead."""
    m = 0.1 * math.log(4.0) + 1.0
    assert layer("deepseek").softmax_scale == pytest.approx(12 ** -0.5 * m * m, rel=1e-12)
    assert layer("zebra").softmax_scale == pytest.approx(12 ** -0.5, rel=1e-12)
    one = jnp.zeros((1, 1), jnp.int32)
    x = jnp.ones((1, 1, 1, 4))
    assert float(jnp.max(jnp.abs(layer("zebra").rotate(x, one)))) == pytest.approx(m, rel=1e-6)
    assert float(jnp.max(jnp.abs(layer("deepseek").rotate(x, one)))) == pytest.approx(1.0)


def model_cfg(name, layers=2):
    return ModelConfig(vocab_size=64, hidden_size=D, intermediate_size=48,
                       layer_pattern=("mla",) * layers, max_position_embeddings=64,
                       mla=VARIANTS[name])


def test_cached_decode_equals_full_forward_in_the_model():
    """Zebra-shaped (the DeepSeek shape runs it in tests/parity). Prefill 5 tokens, then one-token (absorbed) steps with the decode weights (prepared
    W_UK / W_UV, unstacked layout): logits == the full forward's at every position."""
    cfg = model_cfg("zebra")
    params = jax.jit(lambda k: randomized(init_params(cfg, k)))(jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, cfg.vocab_size)
    forward = jax.jit(Transformer(cfg).apply)  # jitted: eagerly the model runs op by op
    full = forward({"params": params}, tokens)[0]
    layout = DecodeLayout(unstacked=True)
    weights = decode_weights(cfg, params, jnp.float32, layout)
    assert "absorbed" in weights["layer_0"]["mixer"]
    model = layout.model(cfg)
    cache = init_cache(cfg, 2, 12, unstacked=True)
    step = jax.jit(lambda w, tok, pos, c: model.apply({"params": w}, tok, pos, c))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    out, cache = step(weights, tokens[:, :5], pos[:, :5], cache)
    outs = [out]
    for t in range(5, 9):
        out, cache = step(weights, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
        outs.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full),
                               rtol=1e-5, atol=1e-5)
    # the stacked (scanned) layout runs the prepared weights too
    stacked = decode_weights(cfg, params, jnp.float32, DecodeLayout())
    assert "absorbed" in stacked["run_0"]["block"]["mixer"]
    c2 = init_cache(cfg, 2, 12)
    o2, c2 = forward({"params": stacked}, tokens[:, :8], pos[:, :8], c2)
    o2, _ = forward({"params": stacked}, tokens[:, 8:], pos[:, 8:], c2)
    np.testing.assert_allclose(np.asarray(o2[:, 0]), np.asarray(full[:, 8]), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planner_reports_latent_plus_rope_per_token_per_layer(dtype):
    """The planner's MLA row is L + R values per token per layer (nothing per head), and equals
    the bytes `init_cache` allocates."""
    cfg = model_cfg("zebra", layers=3)
    sub = spec_of("mla").config(cfg)
    p = plan(cfg, 100, batch=2, dtype=dtype)
    (row,) = p.kinds
    size = jnp.dtype(dtype).itemsize
    assert row.kind == "mla" and row.layers == 3
    assert row.kv_bytes == 3 * 2 * 100 * (sub.latent + sub.rope_dim) * size
    assert row.kv_bytes // (row.layers * 2 * 100 * size) == 12 + 4
    cache = init_cache(cfg, 2, 100, jnp.dtype(dtype))
    floats = [a for a in jax.tree.leaves(cache) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert sum(a.nbytes for a in floats) == row.kv_bytes
    assert row.growing_bytes * 2 == plan(cfg, 200, batch=2, dtype=dtype).kinds[0].growing_bytes
