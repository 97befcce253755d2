"""Mesh construction, the rules table, and sharded == single-device train steps (8 CPU devices)."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllama.config import AttentionConfig, ConfigError, ModelConfig
from jaxllama.model import Transformer, cache_logical_axes, init_cache
from jaxllama.sharding import (
    MeshConfig,
    axes_shardings,
    logical_to_mesh_spec,
    make_mesh,
    param_shardings,
    use_mesh,
)
from jaxllama.training.optimizer import lr_schedule, make_optimizer
from jaxllama.training.step import (
    abstract_params,
    init_state,
    loss_and_grads,
    state_shardings,
    train_step,
)

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, layer_pattern=("dense",) * 2,
                  attention=AttentionConfig(num_heads=4, num_kv_heads=2))


def random_batch(rng, b, t, vocab=96):
    """Packed-looking batch: sorted segment ids, positions restarting per segment, some weights 0."""
    seg = np.sort(rng.integers(1, 4, (b, t)), axis=1).astype(np.int32)
    pos = np.zeros_like(seg)
    for i in range(b):
        for j in range(1, t):
            pos[i, j] = pos[i, j - 1] + 1 if seg[i, j] == seg[i, j - 1] else 0
    return {"inputs": rng.integers(0, vocab, (b, t)).astype(np.int32),
            "targets": rng.integers(0, vocab, (b, t)).astype(np.int32),
            "weights": (rng.random((b, t)) > 0.2).astype(np.float32),
            "positions": pos, "segment_ids": seg}


def test_make_mesh_sizes_and_errors():
    mesh = make_mesh({"data": -1, "fsdp": 2, "tensor": 2, "seq": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "seq": 1, "tensor": 2}
    assert make_mesh(MeshConfig(), jax.devices()[:1]).devices.size == 1
    with pytest.raises(ConfigError, match="mesh: fixed axes .product 3. do not divide the 8"):
        make_mesh({"data": -1, "fsdp": 3})
    with pytest.raises(ConfigError, match="multiply to 4 but there are 8"):
        make_mesh({"data": 2, "fsdp": 2, "tensor": 1, "seq": 1})
    with pytest.raises(ConfigError, match="mesh.tensr: unknown key"):
        make_mesh({"tensr": 2})
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        MeshConfig(data=-1, seq=-1)


def test_rules_map_logical_names():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "seq": 1})
    assert logical_to_mesh_spec(("batch", "seq", "act_embed"), (4, 8, 32), mesh) == P(
        ("data", "fsdp"), None, None)
    # q_proj [D N H]: embed over fsdp, heads over tensor
    assert logical_to_mesh_spec(("embed", "q_heads", "head_dim"), (32, 4, 8), mesh) == P(
        "fsdp", "tensor", None)
    # a dim the mesh axis does not divide is replicated, not a compile error
    assert logical_to_mesh_spec(("embed", "q_heads", "head_dim"), (32, 3, 8), mesh) == P(
        "fsdp", None, None)
    boxed = abstract_params(Transformer(CFG))
    sh = param_shardings(boxed, mesh)
    assert sh["run_0"]["block"]["mixer"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert sh["run_0"]["block"]["mlp"]["down"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert sh["embed"]["embedding"].spec == P("tensor", "fsdp")
    assert sh["norm"]["scale"].spec == P(None)
    cache = init_cache(CFG, 4, 16)
    csh = axes_shardings(cache_logical_axes(CFG), mesh, cache)
    assert csh[0].k.spec == P(None, ("data", "fsdp"), None, "tensor", None)
    placed = jax.device_put(cache, csh)
    assert placed[0].k.sharding.spec == csh[0].k.spec


def test_optimizer_state_follows_params():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "seq": 1})
    tx = make_optimizer(lr_schedule(1e-3, 10, 2))
    sh = state_shardings(Transformer(CFG), tx, mesh)
    mu = sh.opt_state[1][0].mu  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert mu["run_0"]["block"]["mixer"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert sh.opt_state[1][0].count.spec == P()


def _grads_and_update(mesh, batch, cfg=CFG, **kw):
    """Loss, gradients and the updated state of one train step, jitted with the rules' shardings
    (one program: XLA shares the forward/backward between the two results)."""
    model = Transformer(cfg)
    # eps=1 keeps Adam's first update a smooth function of the gradient; with a tiny eps it is
    # lr * sign(g), which turns 1e-7 gradient rounding near g = 0 into lr-sized differences
    tx = make_optimizer(lr_schedule(1e-2, 10, 0), eps=1.0)
    state = init_state(model, tx, mesh, jax.random.key(0))
    sh = state_shardings(model, tx, mesh)

    def both(state, b):
        loss, count, grads = loss_and_grads(state.params, model, b, **kw)
        new_state, metrics = train_step(state, b, model=model, tx=tx, **kw)
        return loss, count, grads, new_state, metrics["loss"]

    fn = jax.jit(both, in_shardings=(sh, None), out_shardings=(None, None, None, sh, None))
    with use_mesh(mesh):
        loss, count, grads, new_state, step_loss = fn(state, batch)
    spec = new_state.params["run_0"]["block"]["mixer"]["q_proj"]["kernel"].sharding.spec
    return jax.device_get((loss, count, grads, new_state.params, step_loss, state.params)), spec


REFERENCE_BATCH = random_batch(np.random.default_rng(0), 8, 32)


@functools.cache
def single_device_reference():
    """Loss, count, grads, updated params of REFERENCE_BATCH on one device (shared by the
    sharded tests here and in tests/parallel, so it compiles once per session)."""
    return _grads_and_update(make_mesh({}, jax.devices()[:1]), REFERENCE_BATCH)[0][:4]


def assert_matches_reference(result):
    """`result` = (loss, count, grads, new params, step loss, initial params) of a sharded run."""
    l0, n0, g0, p0 = single_device_reference()
    l1, n1, g1, p1, s1, init1 = result
    assert n0 == n1 == REFERENCE_BATCH["weights"].sum()
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(s1, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(init1))]
    assert min(moved) > 0  # the step really updated every parameter


@pytest.mark.usefixtures("without_compile_cache")  # the partitioner's warnings print when it runs
def test_sharded_train_step_equals_single_device(capfd):
    """(data, fsdp, tensor) = (2, 2, 2) mesh, chunked loss and 2-way gradient accumulation on the
    sharded side: loss, gradients and the AdamW update equal the single-device step, and XLA's
    partitioner never falls back to replicating a tensor (its warning goes to stderr)."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "seq": 1})
    result, spec = _grads_and_update(mesh, REFERENCE_BATCH, loss_chunk=8, grad_accum=2)
    assert spec == P(None, "fsdp", "tensor", None)
    assert_matches_reference(result)
    err = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in err, err[-2000:]
