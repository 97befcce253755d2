"""Distillation losses against their definitions, learning, and sharding (tiny dense teacher;
dense and lambda students: the loss code never asks a layer's kind).

- `layer_states` is the model's own forward: its per-layer states equal the blocks' outputs
  captured by flax, its last one normed.
- Stage 1 (layer-wise) equals sum over layers of the per-token L2 norm averaged over real
  tokens, each student layer fed the teacher's layer input, the last pair compared after the
  final norms, computed here in float64 NumPy from captured block outputs.
- Stage 2 equals kl_weight KL(teacher || student) + ce_weight CE per weighted token, from the
  two models' full logits in float64; chunked and unchunked agree; the teacher gets no gradient.
- A few steps of each stage lower its loss; the sharded step (8 simulated devices) equals the
  unsharded one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllama.block import Block
from jaxllama.config import AttentionConfig, LambdaConfig, ModelConfig
from jaxllama.model import Transformer, init_params, relayout_params, unstack, unstack_params
from jaxllama.sharding import MeshConfig, make_mesh
from jaxllama.training.distill import (
    compile_distill_step,
    distill_loss_fn,
    layer_states,
    place_teacher,
)
from jaxllama.training.step import init_state

B, T, V = 4, 16, 128  # batch rows are divisible by data x fsdp = 4


def _cfg(pattern) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, layer_pattern=pattern,
                       max_position_embeddings=64,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                       lambda_=LambdaConfig(global_tokens=2, window=6))


TEACHER = _cfg(("dense",) * 2)
STUDENT = _cfg(("lambda", "dense"))  # another kind than the teacher's, and two runs


@pytest.fixture(scope="module")
def teacher_params():
    """A random teacher whose LM head is scaled up so that its next-token distributions are
    peaked (a random init's are nearly uniform: nothing to distill)."""
    params = jax.jit(lambda k: init_params(TEACHER, k))(jax.random.key(0))
    return {**params, "lm_head": {"kernel": 20.0 * params["lm_head"]["kernel"]}}


@jax.jit
def _noisy(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.3 * jnp.std(a) * jax.random.normal(k, a.shape)
                                     for a, k in zip(leaves, keys)])


def _student_params(teacher_params, student=STUDENT):
    """The teacher's weights plus noise, laid out for `student` (dense and lambda layers hold
    the same tensors): a student to distill back."""
    return relayout_params(_noisy(teacher_params), TEACHER, student)


def _batch(seed=0, pad=3):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[1, T - pad:] = 0  # a right-padded row
    weights = rng.uniform(0.5, 1.5, (B, T)).astype(np.float32) * (seg > 0)
    return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
            "weights": weights, "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


@functools.partial(jax.jit, static_argnums=0)
def _captured(cfg, params, batch):
    """Each layer's block output, captured by flax from the unstacked model's own forward."""
    _, state = Transformer(cfg, unstacked=True).apply(
        {"params": unstack_params(cfg, params)}, batch["inputs"], batch["positions"], None,
        batch["segment_ids"], method=Transformer.hidden, capture_intermediates=True,
        mutable=["intermediates"])
    return [state["intermediates"][f"layer_{i}"]["__call__"][0][0]
            for i in range(cfg.num_layers)]


def _rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _loss_and_grads(loss):
    """jit(value_and_grad) over (student, teacher) params: the value and both gradients."""
    def mean(p, tp, b):
        total, count = loss(p, tp, b)
        return total / count

    return jax.jit(jax.value_and_grad(mean, argnums=(0, 1)))


def _assert_teacher_gets_no_gradient(g_student, g_teacher):
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
    assert float(optax.tree.norm(g_student)) > 0


def test_layerwise_loss_matches_its_definition(teacher_params):
    student = STUDENT
    params = _student_params(teacher_params, student)
    batch = _batch()
    loss = distill_loss_fn(Transformer(student), Transformer(TEACHER), "layerwise")
    value, (g_student, g_teacher) = _loss_and_grads(loss)(params, teacher_params, batch)
    _assert_teacher_gets_no_gradient(g_student, g_teacher)
    # layer_states is the model's forward: its states are the blocks' captured outputs
    t_out = [np.asarray(a, np.float64) for a in _captured(TEACHER, teacher_params, batch)]
    states, normed = jax.jit(lambda p, b: layer_states(
        TEACHER, p, b["inputs"], b["positions"], b["segment_ids"]))(teacher_params, batch)
    t_norm = np.asarray(teacher_params["norm"]["scale"])
    for i, out in enumerate(t_out):
        np.testing.assert_allclose(states[i + 1], out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(normed, _rms(t_out[-1], t_norm, TEACHER.rms_norm_eps), rtol=0,
                               atol=1e-4)
    # the definition: student blocks on the teacher's inputs, per-token L2, mean, sum
    emb = np.asarray(teacher_params["embed"]["embedding"], np.float64)[batch["inputs"]]
    t_in = [emb] + t_out[:-1]
    mask = batch["segment_ids"] != 0
    want = 0.0
    for layer, lp in enumerate(unstack(student, params)):
        block = Block(student, student.layer_pattern[layer])
        y, _ = jax.jit(block.apply)({"params": lp}, jnp.asarray(t_in[layer], jnp.float32),
                                    batch["positions"], None, batch["segment_ids"])
        y, t = np.asarray(y, np.float64), t_out[layer]
        if layer == student.num_layers - 1:
            y = _rms(y, np.asarray(params["norm"]["scale"]), student.rms_norm_eps)
            t = _rms(t, t_norm, TEACHER.rms_norm_eps)
        want += np.linalg.norm(y - t, axis=-1)[mask].mean()
    np.testing.assert_allclose(float(value), want, rtol=2e-5)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_loss_matches_its_definition(teacher_params):
    kl_w, ce_w = 0.5, 0.25  # both terms, chunked logits
    params = _student_params(teacher_params)
    batch = _batch(seed=2)
    s_model, t_model = Transformer(STUDENT), Transformer(TEACHER)
    loss = distill_loss_fn(s_model, t_model, "kl", kl_weight=kl_w, ce_weight=ce_w, loss_chunk=4)
    value, (g_student, g_teacher) = _loss_and_grads(loss)(params, teacher_params, batch)
    _assert_teacher_gets_no_gradient(g_student, g_teacher)
    args = (batch["inputs"], batch["positions"], None, batch["segment_ids"])
    ls, lt = jax.jit(lambda p, tp, a: (s_model.apply({"params": p}, *a)[0],
                                       t_model.apply({"params": tp}, *a)[0]))(
        params, teacher_params, args)
    ls, lt = (_log_softmax(np.asarray(x, np.float64)) for x in (ls, lt))
    kl = np.sum(np.exp(lt) * (lt - ls), axis=-1)
    ce = -np.take_along_axis(ls, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["weights"]
    np.testing.assert_allclose(float(value), np.sum(w * (kl_w * kl + ce_w * ce)) / np.sum(w),
                               rtol=2e-5)


def _run(stage, mesh, teacher_params, steps, lr=1e-3):
    student, teacher = Transformer(STUDENT), Transformer(TEACHER)
    tx = optax.adam(lr)
    state = init_state(student, tx, mesh, params=_student_params(teacher_params))
    step = compile_distill_step(student, teacher, place_teacher(teacher, teacher_params, mesh),
                                tx, mesh, stage, loss_chunk=4)
    losses, batch = [], _batch(seed=5)
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("stage", ["layerwise", "kl"])
def test_distillation_lowers_its_loss_and_sharded_equals_unsharded(teacher_params, stage):
    """12 steps on one device and on 8 simulated devices (data x fsdp x tensor): the same
    losses and parameters, and the loss (the KL itself for stage 2) at least halves."""
    assert len(jax.devices()) >= 8
    one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, seq=1), jax.devices()[:1])
    eight = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, seq=1), jax.devices()[:8])
    a, pa = _run(stage, one, teacher_params, steps=12)
    assert a[-1] < 0.5 * a[0], a
    b, pb = _run(stage, eight, teacher_params, steps=12)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("distill", "message"), [
    ({"teacher": "t", "stage": "both"}, "distill.stage: 'both' is not one of"),
    ({"stage": "kl"}, "distill.teacher: a teacher checkpoint is required"),
    ({"teacher": "t", "kl_weight": 0.0}, "distill.kl_weight: kl_weight and ce_weight"),
    ({"teacher": "t", "temperature": 2.0}, "distill.temperature: unknown key"),
])
def test_distill_config_errors_name_the_key(distill, message):
    from jaxllama.config import ConfigError
    from jaxllama.training.config import train_config_from_dict
    with pytest.raises(ConfigError, match=message):
        train_config_from_dict({"distill": distill}, "run.yaml")
    ok = train_config_from_dict({"distill": {"teacher": "t", "stage": "layerwise"}})
    assert ok.distill.stage == "layerwise" and ok.distill.ce_weight == 0.0
