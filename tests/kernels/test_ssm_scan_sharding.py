"""Tensor parallelism of the SSM kinds (`sharding.RULES`: `ssm_inner` and `ssm_heads` over
`tensor`): a Mamba1 + Mamba2 model on 8 simulated devices (data 2 x tensor 4) with its parameters
placed by `param_shardings` gives the unsharded logits, and every parameter with an inner-width
or head axis really is split over `tensor` (its shards are smaller than the array). One compile
per side."""

import flax.linen as nn
import jax
import numpy as np
from kernel_test_base import compile_fast

from jaxllama.config import Mamba2Config, MambaConfig, ModelConfig
from jaxllama.model import Transformer
from jaxllama.sharding import batch_sharding, make_mesh, param_shardings, use_mesh
from jaxllama.training.step import abstract_params

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                  layer_pattern=("mamba", "mamba2"),
                  mamba=MambaConfig(state_size=4, n_groups=2),  # E 64: 16 channels a device
                  mamba2=Mamba2Config(head_dim=8, state_size=4, n_groups=2, chunk_size=4))
SSM_AXES = {"ssm_inner", "ssm_heads"}


def test_tensor_sharded_ssm_forward_equals_unsharded():
    assert len(jax.devices()) == 8
    mesh = make_mesh({"data": 2, "tensor": 4})
    model = Transformer(CFG)
    boxed = abstract_params(model)
    # random values of the abstract shapes (no init compile): A = -exp(A_log) stays negative
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
                          nn.meta.unbox(boxed))
    shardings = param_shardings(boxed, mesh)
    placed = jax.device_put(params, shardings)

    names = jax.tree.leaves(nn.get_partition_spec(boxed),
                            is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    leaves = jax.tree_util.tree_leaves_with_path(placed)
    split = 0
    for spec, (path, leaf) in zip(names, leaves, strict=True):
        if SSM_AXES & set(spec):
            where = jax.tree_util.keystr(path)
            assert "tensor" in str(leaf.sharding.spec), (where, leaf.sharding.spec)
            assert leaf.addressable_shards[0].data.size * 4 == leaf.size, where
            split += 1
    # Mamba1: in_proj, conv kernel + bias, x_proj, dt_proj kernel + bias, A_log, D, out_proj;
    # Mamba2: dt_bias, A_log, D, norm scale, out_proj
    assert split == 14, split

    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 12)).astype(np.int32)
    forward = lambda p, t: model.apply({"params": p}, t)[0]
    want = compile_fast(forward, params, tokens)(params, tokens)
    with use_mesh(mesh):
        tokens = jax.device_put(tokens, batch_sharding(mesh))
        got = compile_fast(forward, placed, tokens)(placed, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
