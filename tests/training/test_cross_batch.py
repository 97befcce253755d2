"""Cross-batch training of FoT memory layers (METHODS section 7, `fot.cross_batch_range`): the
layer against a from-the-definition NumPy reference, gradients into the previous rows, sharded
== unsharded on 8 simulated devices, and a tiny training run that lowers the loss.

Rows of a batch are placed on the `data` axis in order (row b on shard b // (B / shards)); a
memory layer shifts keys and values along the batch axis, so each shard also receives the d rows
before its first one from its neighbour."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllama.config import AttentionConfig, FoTConfig, ModelConfig
from jaxllama.mixers import spec_of
from jaxllama.model import Transformer, init_params
from jaxllama.sharding import batch_sharding, make_mesh, use_mesh

B, T, D, N, K, H, RANGE = 4, 5, 32, 4, 2, 8, 2
# rows 0, 1 are parts of document 7, rows 2, 3 of document 9; row 3 ends with padding (id 0)
SEG = np.array([[7] * T, [7] * T, [9] * T, [9, 9, 9, 0, 0]], np.int32)


def model_cfg(kind="fot", layers=1, d=RANGE) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=D, intermediate_size=48,
                       layer_pattern=(kind,) * layers, max_position_embeddings=16,
                       attention=AttentionConfig(num_heads=N, num_kv_heads=K, head_dim=H),
                       fot=FoTConfig(last_context_length=8, mem_dtype="float32",
                                     cross_batch_range=d))


@pytest.fixture(scope="module")
def layer():
    cfg = spec_of("fot").config(model_cfg())
    module = spec_of("fot").module(cfg=cfg)
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    params = nn.meta.unbox(module.init(jax.random.key(1), x, pos)["params"])
    apply = jax.jit(lambda p, x, seg: module.apply({"params": p}, x, pos, None, seg)[0])
    return cfg, params, x, apply


def rope_np(x, pos, theta=10000.0):
    """HF rotate-half RoPE: x [T n H] at integer positions [T]."""
    inv = 1.0 / theta ** (np.arange(0, H, 2) / H)
    ang = np.concatenate([pos[:, None] * inv] * 2, -1)[:, None]  # [T 1 H]
    half = np.concatenate([-x[..., H // 2:], x[..., :H // 2]], -1)
    return x * np.cos(ang) + half * np.sin(ang)


def reference(params, x, seg, d):
    """Row b, query i, head n: own row keys j <= i and rows b-1 .. b-d (all positions, keys at
    position 0), each only with an equal segment id; one softmax; float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", x, p["q_proj"]["kernel"])
    k = np.einsum("btd,dkh->btkh", x, p["k_proj"]["kernel"])
    v = np.einsum("btd,dkh->btkh", x, p["v_proj"]["kernel"])
    pos = np.arange(T)
    out = np.zeros((B, T, N, H))
    for b in range(B):
        qb, kb = rope_np(q[b], pos), rope_np(k[b], pos)
        for i in range(T):
            for n in range(N):
                g = n // (N // K)
                keys = [kb[j, g] for j in range(i + 1) if seg[b, j] == seg[b, i]]
                vals = [v[b, j, g] for j in range(i + 1) if seg[b, j] == seg[b, i]]
                for r in range(max(b - d, 0), b):
                    keys += [k[r, j, g] for j in range(T) if seg[r, j] == seg[b, i]]
                    vals += [v[r, j, g] for j in range(T) if seg[r, j] == seg[b, i]]
                s = np.array(keys) @ qb[i, n] / np.sqrt(H)
                w = np.exp(s - s.max())
                out[b, i, n] = (w / w.sum()) @ np.array(vals)
    return np.einsum("btnh,nhd->btd", out, p["o_proj"]["kernel"])


def test_layer_matches_the_definition(layer):
    _, params, x, apply = layer
    got = np.asarray(apply(params, x, jnp.asarray(SEG)))
    want = reference(params, x, SEG, RANGE)
    real = SEG != 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
    # without cross-batch the first row of each document differs from no row but itself; a
    # later row reads its predecessor: switching the range off changes row 1, not row 0
    plain = reference(params, x, SEG, 0)
    np.testing.assert_allclose(want[0], plain[0], atol=1e-12)
    assert np.abs(want[1] - plain[1]).max() > 1e-3


def test_gradients_flow_into_previous_rows_of_the_same_document(layer):
    _, params, x, apply = layer
    seg = jnp.asarray(SEG)
    grad = jax.grad(lambda x, r: apply(params, x, seg)[r].sum())
    g1, g2 = grad(x, 1), grad(x, 2)
    assert np.abs(np.asarray(g1[0])).max() > 1e-4  # row 1 reads row 0 (document 7)
    assert np.abs(np.asarray(g2[1])).max() == 0.0  # row 2 (document 9) must not read row 1
    assert np.abs(np.asarray(g2[0])).max() == 0.0


@pytest.fixture(scope="module")
def model2():
    """The 2-layer model (fot_local, fot) on 8 rows, documents of 2 rows (row 2j+1 continues row
    2j), and its unsharded loss-and-gradient function: compiled once, shared by the sharded test
    (its reference) and the tiny run."""
    cfg = model_cfg("fot", 1).replace(layer_pattern=("fot_local", "fot"))
    params = init_params(cfg, jax.random.key(0), seq_len=T)
    data = np.random.default_rng(0).integers(1, 64, (4, 2 * T))
    tokens = jnp.asarray(data.reshape(8, T))  # document j = rows 2j, 2j+1
    seg = jnp.repeat(jnp.arange(1, 5), 2)[:, None] * jnp.ones((8, T), jnp.int32)
    model = Transformer(cfg)

    def loss(p, tok, s):
        logits, _ = model.apply({"params": p}, tok, segment_ids=s)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()

    return params, tokens, seg, jax.jit(jax.value_and_grad(loss))


def test_sharded_equals_unsharded_on_8_devices(model2):
    """The 2-layer model on 8 rows, one per device on `data` (so each 2-row document straddles
    a shard edge): the loss and its gradients equal the unsharded ones."""
    params, tokens, seg, f = model2
    want_l, want_g = f(params, tokens, seg)
    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1, "seq": 1})
    sh = batch_sharding(mesh)
    with use_mesh(mesh):
        got_l, got_g = f(params, jax.device_put(tokens, sh), jax.device_put(seg, sh))
    np.testing.assert_allclose(float(got_l), float(want_l), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_tiny_cross_batch_run_lowers_the_loss(model2):
    """Documents of 2 rows: row 2j+1 continues row 2j. 30 Adam steps lower the loss."""
    params, tokens, seg, f = model2
    opt = optax.adam(3e-3)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p))
    state, losses = opt.init(params), []
    for _ in range(30):
        value, g = f(params, tokens, seg)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        losses.append(float(value))
    assert losses[-1] < 0.7 * losses[0]
