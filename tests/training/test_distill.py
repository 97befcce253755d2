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

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllama.block import Block
from jaxllama.config import AttentionConfig, LambdaConfig, ModelConfig
from jaxllama.model import Transformer, init_params, relayout_params, unstack, unstack_params
from jaxllama.sharding import MeshConfig, make_mesh, use_mesh
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


def _loss_and_grads(loss, reference=None):
    """One jitted program (one compile): the mean loss, its gradients over (student, teacher)
    params, and `reference(p, tp, b)`'s arrays for the test's own definition."""
    def mean(p, tp, b):
        total, count = loss(p, tp, b)
        return total / count

    grads = jax.value_and_grad(mean, argnums=(0, 1))
    return jax.jit(lambda p, tp, b: (grads(p, tp, b),
                                     None if reference is None else reference(p, tp, b)))


def _assert_teacher_gets_no_gradient(g_student, g_teacher):
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
    assert float(optax.tree.norm(g_student)) > 0


def _layerwise_reference(student):
    """The definition's float32 pieces: the teacher's blocks' outputs captured by flax, the
    teacher's `layer_states`, and each student block on the teacher's input of its layer."""
    def reference(p, tp, b):
        t_out = _captured(TEACHER, tp, b)
        states = layer_states(TEACHER, tp, b["inputs"], b["positions"], b["segment_ids"])
        t_in = [tp["embed"]["embedding"][b["inputs"]]] + t_out[:-1]
        ys = [Block(student, student.layer_pattern[layer]).apply(
                  {"params": lp}, t_in[layer], b["positions"], None, b["segment_ids"])[0]
              for layer, lp in enumerate(unstack(student, p))]
        return t_out, states, ys
    return reference


def test_layerwise_loss_matches_its_definition(teacher_params):
    student = STUDENT
    params = _student_params(teacher_params, student)
    batch = _batch()
    loss = distill_loss_fn(Transformer(student), Transformer(TEACHER), "layerwise")
    (value, (g_student, g_teacher)), (t_out, (states, normed), ys) = _loss_and_grads(
        loss, _layerwise_reference(student))(params, teacher_params, batch)
    _assert_teacher_gets_no_gradient(g_student, g_teacher)
    # layer_states is the model's forward: its states are the blocks' captured outputs
    t_out = [np.asarray(a, np.float64) for a in t_out]
    t_norm = np.asarray(teacher_params["norm"]["scale"])
    for i, out in enumerate(t_out):
        np.testing.assert_allclose(states[i + 1], out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(normed, _rms(t_out[-1], t_norm, TEACHER.rms_norm_eps), rtol=0,
                               atol=1e-4)
    # the definition: student blocks on the teacher's inputs, per-token L2, mean, sum
    emb = np.asarray(teacher_params["embed"]["embedding"], np.float64)[batch["inputs"]]
    np.testing.assert_array_equal(np.asarray(states[0], np.float64), emb)  # the layer-0 input
    mask = batch["segment_ids"] != 0
    want = 0.0
    for layer, y in enumerate(ys):
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

    def logits(p, tp, b):  # both models' full logits, for the definition
        args = (b["inputs"], b["positions"], None, b["segment_ids"])
        return s_model.apply({"params": p}, *args)[0], t_model.apply({"params": tp}, *args)[0]

    (value, (g_student, g_teacher)), (ls, lt) = _loss_and_grads(loss, logits)(
        params, teacher_params, batch)
    _assert_teacher_gets_no_gradient(g_student, g_teacher)
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
        assert bool(m["finite"])
        losses.append(float(m["loss"]))
    params = jax.device_get(state.params)
    # a guarded step: a teacher that makes the loss non-finite leaves the state as it was
    bad = place_teacher(teacher, jax.tree.map(lambda a: a * jnp.nan, teacher_params), mesh)
    with use_mesh(mesh):  # as `step` calls it: the same program, no new compile
        kept, m = step.jitted(state, bad, batch)
    assert not bool(m["finite"]) and int(kept.step) == steps
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(kept.params))):
        np.testing.assert_array_equal(x, y)
    return losses, params


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
