"""Ring and all-gather context parallelism on 8 simulated CPU devices == full causal attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxllama.kernels.flash_attention.api import Mask, attend

from jaxllama.config import KernelConfig
from jaxllama.model import Transformer
from jaxllama.parallel import context_attend, from_zigzag, to_zigzag, zigzag_indices
from jaxllama.sharding import make_mesh, use_mesh
from jaxllama.training.optimizer import lr_schedule, make_optimizer
from jaxllama.training.step import init_state, loss_and_grads, state_shardings
from tests.test_sharding import CFG, random_batch


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


def test_seq_sharded_loss_and_grads_equal_single_device():
    """The model with ring attention on a data x seq x tensor mesh (zigzag batch) gives the loss
    and parameter gradients of the single-device model on the natural-order batch."""
    batch = random_batch(np.random.default_rng(3), 4, 32)
    tx = make_optimizer(lr_schedule(1e-3, 10, 0))
    out = []
    for mesh_cfg, ways, cp in (({}, 1, "none"), ({"data": 2, "seq": 2, "tensor": 2}, 2, "ring")):
        devices = jax.devices()[:1] if ways == 1 else None
        mesh = make_mesh(mesh_cfg, devices)
        model = Transformer(CFG.replace(kernels=KernelConfig(context_parallel=cp)))
        params = init_state(model, tx, mesh, jax.random.key(0)).params
        sh = state_shardings(model, tx, mesh)
        fn = jax.jit(lambda p, b, model=model: loss_and_grads(p, model, b, loss_chunk=8),
                     in_shardings=(sh.params, None))
        with use_mesh(mesh):
            out.append(jax.device_get(fn(params, {k: to_zigzag(a, ways)
                                                  for k, a in batch.items()})))
    (l0, n0, g0), (l1, n1, g1) = out
    assert n0 == n1
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
