"""Sequence parallelism of the `mamba` and `mamba2` mixers on 8 simulated devices (data x seq x
tensor = 2 x 2 x 2), in the zigzag layout every context-parallel batch has (the layout ring
attention uses, so a hybrid moves no activations between its attention and SSM layers): outputs
and gradients (params and inputs) of a packed batch equal the unsharded mixer's. Each device
scans its two pieces from zero, the shard states are combined across devices
(parallel/ssm_sequence.py), and the conv reads the W-1 inputs before each piece from the device
holding the previous piece."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllama.config import KernelConfig, Mamba2Config, MambaConfig, ModelConfig
from jaxllama.mixers import spec_of
from jaxllama.parallel import from_zigzag, to_zigzag
from jaxllama.sharding import make_mesh, use_mesh

TINY = {"mamba": {"mamba": MambaConfig(state_size=4, n_groups=2)},
        "mamba2": {"mamba2": Mamba2Config(head_dim=8, state_size=4, n_groups=2, chunk_size=4)}}


def loss_fn(module):
    def f(params, x, seg, w):
        y, _ = module.apply({"params": params}, x, jnp.zeros(seg.shape, jnp.int32), None, seg)
        return jnp.sum(y * w), y
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_zigzag_sharded_mixer_equals_unsharded(kind):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=0, layer_pattern=(kind,),
                      **TINY[kind])
    spec = spec_of(kind)
    plain = spec.module(cfg=spec.config(cfg))
    sharded = spec.module(cfg=spec.config(cfg), kernels=KernelConfig(context_parallel="ring"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 32, 32)).astype(np.float32)
    seg = np.sort(rng.integers(1, 4, (4, 32)), axis=1).astype(np.int32)
    seg[1, :5] = 0  # a left-padded row
    w = rng.normal(size=(4, 32, 32)).astype(np.float32)
    params = nn.meta.unbox(plain.init(jax.random.key(1), x[:1, :8], jnp.zeros((1, 8), jnp.int32))
                           ["params"])
    (l0, y0), (gp0, gx0) = loss_fn(plain)(params, x, seg, w)
    mesh = make_mesh({"data": 2, "seq": 2, "tensor": 2})
    put = lambda a: jax.device_put(to_zigzag(a, 2), NamedSharding(mesh, P("data", "seq")))
    fn = loss_fn(sharded)
    with use_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(fn)(params, put(x), put(seg), put(w)))
        (l1, y1), (gp1, gx1) = fn(params, put(x), put(seg), put(w))
    assert jaxpr.count("shard_map") >= 2  # the conv and the scan ran sequence-parallel
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    np.testing.assert_allclose(from_zigzag(np.asarray(y1), 2), y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_zigzag(np.asarray(gx1), 2), gx0, rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp0), jax.tree.leaves(gp1),
                            strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=str(path))
