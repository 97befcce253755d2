"""Ring attention for MLA layers (the latent travels) on 8 simulated CPU devices == unsharded:
outputs, input gradients and every parameter gradient (kv_b's reaches through each ring step's
expansion)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.config import KernelConfig, MLAConfig, RopeConfig
from jaxllama.mixers.mla_attention import MLAttention, MLAttentionConfig
from jaxllama.parallel import from_zigzag, to_zigzag
from jaxllama.sharding import make_mesh, use_mesh

CFG = MLAttentionConfig(32, 64, MLAConfig(
    num_heads=4, num_kv_heads=2, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=6, rope=RopeConfig(type="yarn", factor=4.0,
                                                      original_max_position_embeddings=16,
                                                      mscale=1.0, mscale_all_dim=1.0)))
B, T = 2, 32


@pytest.mark.parametrize("axes", [{"data": 2, "seq": 4}, {"tensor": 2, "seq": 4}],
                         ids=["data2-seq4", "tensor2-seq4"])
def test_ring_mla_matches_unsharded(axes):
    ways = axes["seq"]
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (B, T, 32))
    ct = jax.random.normal(ks[1], (B, T, 32))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    # packed documents: many ring blocks hold rows that see no key of the block
    seg = jnp.asarray(np.sort(np.random.default_rng(1).integers(1, 5, (B, T)), axis=1), jnp.int32)
    params = nn.meta.unbox(MLAttention(CFG).init(ks[2], x, pos)["params"])
    params = jax.tree.map(lambda a: a * 8, params)  # O(1) scores, so a wrong block shows

    def loss(module, x, pos, seg, ct):
        def f(p, x):
            y, _ = module.apply({"params": p}, x, pos, None, seg)
            return jnp.sum(y * ct), y
        return jax.grad(f, argnums=(0, 1), has_aux=True)

    plain = MLAttention(CFG)
    (g_ref, gx_ref), y_ref = jax.jit(loss(plain, x, pos, seg, ct))(params, x)
    ring = MLAttention(CFG, kernels=KernelConfig(context_parallel="ring"))
    z = lambda a: to_zigzag(a, ways)
    with use_mesh(make_mesh(axes)):
        (g, gx), y = jax.jit(loss(ring, z(x), z(pos), z(seg), z(ct)))(params, z(x))
    assert float(jnp.max(jnp.abs(y_ref))) > 0.5
    assert rel_err(from_zigzag(y, ways), y_ref) < 1e-5
    assert rel_err(from_zigzag(gx, ways), gx_ref) < 1e-5
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_ref),
                            strict=True):
        assert rel_err(a, b) < 1e-5, jax.tree_util.keystr(path)


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (gradients here reach a few hundred: an absolute bound per
    element would test cancellation, not the ring)."""
    got, want = np.asarray(got), np.asarray(want)
    assert np.all(np.isfinite(got))
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_allgather_is_refused():
    with pytest.raises(Exception, match="not supported by mla"):
        from jaxllama.config import ModelConfig
        ModelConfig(layer_pattern=("mla",), mla=CFG.mla,
                    kernels=KernelConfig(context_parallel="allgather"))
