"""Lambda attention: literal masks, a float64 reference written from the definition (METHODS 5),
chunked prefill + decode == full forward, constant cache size, hybrid models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.config import AttentionConfig, LambdaConfig, ModelConfig
from jaxllama.mixers.attention import Attention
from jaxllama.mixers.lambda_attention import (
    LambdaAttention,
    LambdaAttentionConfig,
    LambdaCache,
    segment_offsets,
)
from jaxllama.model import Transformer, init_cache


def mixer_cfg(g, w, d=None, n=4, k=2, h=8, hidden=24):
    return LambdaAttentionConfig.from_model(ModelConfig(
        vocab_size=8, hidden_size=hidden, intermediate_size=8, layer_pattern=("lambda",),
        attention=AttentionConfig(num_heads=n, num_kv_heads=k, head_dim=h),
        lambda_=LambdaConfig(global_tokens=g, window=w, distance=d)))


def init_mixer(cfg, seed=0):
    m = LambdaAttention(cfg)
    x = jnp.zeros((1, 4, cfg.hidden_size))
    # jitted: eager init runs the mixer op by op, one small compile per op
    params = jax.tree.map(lambda a: a * 8.0,  # sharper scores than the 0.02 init
                          jax.jit(m.init)(jax.random.key(seed), x, jnp.arange(4)[None])["params"])
    return m, jax.tree.map(lambda a: getattr(a, "value", a), params,
                           is_leaf=lambda a: hasattr(a, "value"))


# ----------------------------------------------------------------------------- literal masks

def visibility(cfg, segment_ids=None, chunks=None, seed=0):
    """Which keys each query attends to, read off the real module: identity projections and
    one-hot values make output[i, j] = attention weight of query i on key j."""
    t = cfg.head_dim  # one head of width T: values are one-hot key indices
    eye = np.eye(3 * t, dtype=np.float32)
    params = {"q_proj": {"kernel": eye[:, None, :t]}, "k_proj": {"kernel": eye[:, None, t:2 * t]},
              "v_proj": {"kernel": eye[:, None, 2 * t:]}, "o_proj": {"kernel": eye[None, :t]}}
    rng = np.random.default_rng(seed)
    qk = rng.normal(size=(1, t, 2 * t)).astype(np.float32) * 0.3
    x = jnp.asarray(np.concatenate([qk, np.eye(t, dtype=np.float32)[None]], -1))
    apply = jax.jit(LambdaAttention(cfg).apply)
    if chunks is None:
        pos = segment_offsets(segment_ids) if segment_ids is not None else jnp.arange(t)[None]
        y, _ = apply({"params": params}, x, pos, None, segment_ids)
    else:
        cache, ys, a = LambdaCache.init(cfg, 1, 0, jnp.float32), [], 0
        for c in chunks:
            y, cache = apply({"params": params}, x[:, a:a + c], jnp.arange(a, a + c)[None], cache)
            ys.append(y)
            a += c
        y = jnp.concatenate(ys, 1)
    return (np.asarray(y)[0, :, :t] > 1e-6).astype(int)


LAMBDA_G2_L3 = np.array([  # G=2, L=3, 10 tokens: last 3 keys, plus keys 0, 1 once 3 or more back
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 0, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 0, 0, 1, 1, 1, 0, 0, 0],
    [1, 1, 0, 0, 0, 1, 1, 1, 0, 0],
    [1, 1, 0, 0, 0, 0, 1, 1, 1, 0],
    [1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
])

PACKED_G1_L2 = np.array([  # G=1, L=2, segments [5 tokens | 5 tokens]
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    [1, 0, 1, 1, 0, 0, 0, 0, 0, 0],
    [1, 0, 0, 1, 1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 1, 0, 1, 1, 0],
    [0, 0, 0, 0, 0, 1, 0, 0, 1, 1],
])


def test_mask_literal_full_sequence():
    cfg = mixer_cfg(2, 3, h=10, n=1, k=1, hidden=30)
    np.testing.assert_array_equal(visibility(cfg), LAMBDA_G2_L3)


def test_mask_literal_through_cache():
    # a chunk inside the sinks, one longer than the window and crossing G, then decode steps
    cfg = mixer_cfg(2, 3, h=10, n=1, k=1, hidden=30)
    np.testing.assert_array_equal(visibility(cfg, chunks=[1, 5, 1, 1, 1, 1]), LAMBDA_G2_L3)


def test_mask_literal_packed_segments():
    cfg = mixer_cfg(1, 2, h=10, n=1, k=1, hidden=30)
    seg = jnp.array([[3, 3, 3, 3, 3, 7, 7, 7, 7, 7]])
    np.testing.assert_array_equal(visibility(cfg, segment_ids=seg), PACKED_G1_L2)


def test_no_sinks_is_sliding_window():
    cfg = mixer_cfg(0, 3, h=10, n=1, k=1, hidden=30)
    expect = np.tril(np.triu(np.ones((10, 10), int), -2))
    np.testing.assert_array_equal(visibility(cfg), expect)
    np.testing.assert_array_equal(visibility(cfg, chunks=[1] * 10), expect)


# ----------------------------------------------------------------------------- definition reference

def rope_np(x, pos, theta=10000.0):
    """Rotate-half RoPE in float64: x [B T N H] at integer positions pos [B T]."""
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = np.asarray(pos, np.float64)[..., None] * inv
    ang = np.concatenate([ang, ang], -1)[:, :, None]
    rot = np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def lambda_reference(params, x, g, w, d, segment_ids=None):
    """METHODS 5 from the definition, one (query, key) pair at a time, float64."""
    p = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
    pos = np.asarray(segment_offsets(jnp.asarray(seg)))  # position inside the segment
    q = np.einsum("btd,dnh->btnh", x, p["q_proj"])
    k = np.einsum("btd,dkh->btkh", x, p["k_proj"])
    v = np.einsum("btd,dkh->btkh", x, p["v_proj"])
    n, kh, hd = q.shape[2], k.shape[2], q.shape[3]
    rq, rk = rope_np(q, pos), rope_np(k, pos)
    dq = rope_np(q, np.full_like(pos, d))
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(t):
            for hq in range(n):
                hk = hq // (n // kh)
                scores = np.full(t, -np.inf)
                for j in range(t):
                    if seg[bi, j] != seg[bi, i]:
                        continue
                    dist = pos[bi, i] - pos[bi, j]
                    if 0 <= dist < w:
                        scores[j] = rq[bi, i, hq] @ rk[bi, j, hk]
                    elif dist >= w and pos[bi, j] < g:
                        scores[j] = dq[bi, i, hq] @ k[bi, j, hk]
                scores = scores / np.sqrt(hd)
                e = np.exp(scores - scores.max())
                out[bi, i, hq] = (e / e.sum()) @ v[bi, :, hk]
    return np.einsum("btnh,nhd->btd", out, p["o_proj"])


@pytest.mark.parametrize("g,w,d", [(3, 5, 5), (2, 4, 9)])
def test_matches_definition(g, w, d):
    cfg = mixer_cfg(g, w, d)
    m, params = init_mixer(cfg, seed=g)
    x = jax.random.normal(jax.random.key(10 + g), (2, 23, cfg.hidden_size))
    y, _ = jax.jit(m.apply)({"params": params}, x, jnp.broadcast_to(jnp.arange(23), (2, 23)))
    ref = lambda_reference(params, x, g, w, d)
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-5, rtol=1e-5)
    # and the result really is different from plain causal attention
    dense = lambda_reference(params, x, g, 10**6, d)
    assert np.abs(ref - dense).max() > 1e-2


def test_packed_segments_match_definition():
    g, w, d = 2, 4, 4
    cfg = mixer_cfg(g, w, d)
    m, params = init_mixer(cfg, seed=3)
    seg = jnp.array([[1] * 9 + [2] * 11 + [0] * 3, [5] * 23])
    x = jax.random.normal(jax.random.key(7), (2, 23, cfg.hidden_size))
    apply = jax.jit(m.apply)
    y, _ = apply({"params": params}, x, segment_offsets(seg), None, seg)
    np.testing.assert_allclose(np.asarray(y), lambda_reference(params, x, g, w, d, seg),
                               atol=2e-5, rtol=1e-5)
    # the second segment alone, unpacked, gives the same outputs
    alone, _ = apply({"params": params}, x[:1, 9:20], jnp.arange(11)[None])
    np.testing.assert_allclose(np.asarray(y[:1, 9:20]), np.asarray(alone), atol=1e-5)


# ----------------------------------------------------------------------------- cache

def cache_signature(cache):
    return [(a.shape, a.dtype, a.nbytes) for a in jax.tree.leaves(cache)]


def test_chunked_prefill_and_decode_match_full_forward():
    g, w = 3, 6
    cfg = mixer_cfg(g, w)
    m, params = init_mixer(cfg, seed=5)
    t = 4 * w + 7  # decode well past 4 x L
    x = jax.random.normal(jax.random.key(11), (2, t, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    step = jax.jit(m.apply)
    full, _ = step({"params": params}, x, pos)
    cache = LambdaCache.init(cfg, 2, 0, jnp.float32)
    signature = cache_signature(cache)
    assert sum(s[2] for s in signature) == (2 * 2 * (g + w) * 2 * 8 * 4  # k, v float32
                                            + 2 * (g + w) * 4 + 2 * 4 + 4)  # ids, first, length
    outs, a = [], 0
    for c in [2, 7, 7] + [1] * (t - 16):  # first chunk inside the sinks, chunks longer than L
        y, cache = step({"params": params}, x[:, a:a + c], pos[:, a:a + c], cache)
        assert cache_signature(cache) == signature
        outs.append(y)
        a += c
    assert int(cache.length) == t
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_left_padded_rows_match_each_row_alone():
    """Leading padding (segment id 0, positions from 0 at the first real token, as the generation
    engine lays out a batch): every row computes what it computes unpadded; sinks are each row's
    first G real tokens even when they arrive in a later chunk than the padding."""
    g, w = 3, 5
    cfg = mixer_cfg(g, w)
    m, params = init_mixer(cfg, seed=6)
    step = jax.jit(m.apply)
    pads, total = [0, 4, 9], 23
    x = jax.random.normal(jax.random.key(14), (3, total, cfg.hidden_size))
    slot = np.arange(total)[None, :]
    lead = np.array(pads)[:, None]
    seg = jnp.asarray((slot >= lead).astype(np.int32))
    pos = jnp.asarray(np.maximum(slot - lead, 0))
    cache = LambdaCache.init(cfg, 3, 0, jnp.float32)
    outs, a = [], 0
    for c in [7, 7] + [1] * (total - 14):
        y, cache = step({"params": params}, x[:, a:a + c], pos[:, a:a + c], cache, seg[:, a:a + c])
        outs.append(y)
        a += c
    y = np.concatenate(outs, 1)
    full = jax.jit(m.apply)
    for b, p in enumerate(pads):
        alone, _ = full({"params": params}, x[b:b + 1, p:], jnp.arange(total - p)[None])
        np.testing.assert_allclose(y[b, p:], np.asarray(alone[0]), atol=1e-5, rtol=1e-5)
    assert int(cache.length) == total and cache.first_slot.tolist() == pads


def test_bfloat16_cache_close_to_float32():
    cfg = mixer_cfg(2, 5)
    m, params = init_mixer(cfg, seed=8)
    x = jax.random.normal(jax.random.key(12), (1, 16, cfg.hidden_size))
    pos = jnp.arange(16)[None]
    apply = jax.jit(m.apply)
    full, _ = apply({"params": params}, x, pos)
    cache = LambdaCache.init(cfg, 1, 0, jnp.bfloat16)
    y1, cache = apply({"params": params}, x[:, :8], pos[:, :8], cache)
    y2, cache = apply({"params": params}, x[:, 8:], pos[:, 8:], cache)
    assert cache.ring_k.dtype == jnp.bfloat16
    err = np.abs(np.concatenate([y1, y2], 1) - np.asarray(full)).max()
    assert err < 3e-2 * np.abs(np.asarray(full)).max(), err


# ----------------------------------------------------------------------------- models

def model_cfg(pattern, g=2, w=5):
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, layer_pattern=pattern,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                       lambda_=LambdaConfig(global_tokens=g, window=w))


def jit_init(cfg, seed):
    """Random model params; jitted (eager init runs the attention reference op by op: slow)."""
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    return nn.meta.unbox(variables["params"])


def test_hybrid_model_decode_matches_full_forward():
    cfg = model_cfg(("lambda", "dense", "lambda"))
    assert [k for k, _ in cfg.runs] == ["lambda", "dense", "lambda"]
    params = jax.tree.map(lambda a: a * 5.0, jit_init(cfg, 0))
    model = Transformer(cfg)
    t = 22  # > 4 x L
    tokens = jax.random.randint(jax.random.key(1), (2, t), 0, 64)
    step = jax.jit(model.apply)
    full, _ = step({"params": params}, tokens)
    cache = init_cache(cfg, 2, 32)
    assert isinstance(cache[0], LambdaCache) and cache[0].ring_k.shape == (1, 2, 5, 2, 8)
    outs, a = [], 0
    for c in [8] + [1] * (t - 8):
        pos = jnp.broadcast_to(jnp.arange(a, a + c), (2, c))
        y, cache = step({"params": params}, tokens[:, a:a + c], pos, cache)
        outs.append(y)
        a += c
    full = np.asarray(full)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5 * np.abs(full).max(),
                               rtol=1e-5)


def test_window_covering_the_sequence_is_dense():
    """With L >= T no key is ever out of the window: lambda == dense attention, same weights."""
    long_cfg, short_cfg = mixer_cfg(3, 16), mixer_cfg(3, 8)
    m, params = init_mixer(long_cfg, seed=4)
    x = jax.random.normal(jax.random.key(13), (2, 16, long_cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    dense, _ = jax.jit(Attention(long_cfg).apply)({"params": params}, x, pos)
    lam, _ = jax.jit(m.apply)({"params": params}, x, pos)
    np.testing.assert_allclose(np.asarray(lam), np.asarray(dense), atol=1e-5, rtol=1e-5)
    short, _ = jax.jit(LambdaAttention(short_cfg).apply)({"params": params}, x, pos)
    np.testing.assert_allclose(np.asarray(short[:, :8]), np.asarray(dense[:, :8]), atol=1e-5,
                               rtol=1e-5)
    assert np.abs(np.asarray(short[:, 8:]) - np.asarray(dense[:, 8:])).max() > 1e-3
