"""Ring and all-gather context parallelism on 8 simulated CPU devices == full causal attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxllama.kernels.flash_attention.api import Mask, attend

from jaxllama.config import KernelConfig
from jaxllama.parallel import context_attend, from_zigzag, to_zigzag, zigzag_indices
from jaxllama.sharding import make_mesh, use_mesh
from tests.test_sharding import CFG, REFERENCE_BATCH, _grads_and_update, assert_matches_reference


def test_zigzag_layout_literal():
    # 2 devices, 4 chunks of 2: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2
    np.testing.assert_array_equal(zigzag_indices(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
    x = np.arange(24).reshape(2, 12)
    np.testing.assert_array_equal(from_zigzag(to_zigzag(x, 3), 3), x)
    with pytest.raises(ValueError, match="not divisible by 2 x 4"):
        zigzag_indices(12, 4)


def _inputs(b=2, t=64, n=4, k=2, h=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h))
    kk = jax.random.normal(ks[1], (b, t, k, h))
    v = jax.random.normal(ks[2], (b, t, k, h))
    ct = jax.random.normal(ks[3], (b, t, n, h))
    # packed documents: sorted ids, so many ring blocks hold rows that see no key of the block
    seg = jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 5, (b, t)), axis=1),
                      jnp.int32)
    return q, kk, v, ct, seg


@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_context_parallel_matches_full_causal_attention(mode):
    """GQA (4 query / 2 kv heads), segment ids, seq axis of 4 with data axis of 2: outputs and
    dq, dk, dv of the zigzag-sharded attention equal dense causal attention."""
    q, k, v, ct, seg = _inputs()
    ways = 4
    mesh = make_mesh({"data": 2, "seq": ways})

    def full(q, k, v):
        return attend(q, k, v, Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg),
                      implementation="xla")

    zseg, zct = to_zigzag(seg, ways), to_zigzag(ct, ways)

    def sharded(q, k, v):
        return context_attend(q, k, v, zseg, mode=mode, implementation="xla")

    zq, zk, zv = (to_zigzag(a, ways) for a in (q, k, v))
    with use_mesh(mesh):
        out = jax.jit(sharded)(zq, zk, zv)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(sharded(*a) * zct), argnums=(0, 1, 2)))(
            zq, zk, zv)
    ref = full(q, k, v)
    ref_grads = jax.grad(lambda *a: jnp.sum(full(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(from_zigzag(out, ways), ref, atol=2e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(from_zigzag(g, ways), r, atol=5e-6, rtol=1e-5)


def test_seq_sharded_train_step_equals_single_device():
    """The model with ring attention on a data x seq x tensor = 2 x 2 x 2 mesh, fed the zigzag
    layout of the batch, gives the single-device loss, gradients and AdamW update."""
    mesh = make_mesh({"data": 2, "seq": 2, "tensor": 2})
    cfg = CFG.replace(kernels=KernelConfig(context_parallel="ring"))
    batch = {k: to_zigzag(a, 2) for k, a in REFERENCE_BATCH.items()}
    result, _ = _grads_and_update(mesh, batch, cfg, loss_chunk=8)
    assert_matches_reference(result)
