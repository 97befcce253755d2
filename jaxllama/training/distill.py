"""Distillation from a teacher: layer-wise (stage 1) and end-to-end KL (stage 2).

Zebra-Llama's recipe (METHODS section 9, the reference's `KDTrainer`):

- **Stage 1, layer-wise** (the reference's ILD): the teacher runs once and gives every layer's
  input and output; student layer l is fed the teacher's input of layer l, and its output is
  pulled to the teacher's output of layer l by the L2 norm of the difference per token (not
  squared), averaged over tokens and summed over layers. As in the reference, the last layer is
  compared after each model's final norm (the reference's last hidden state is the normed one).
  Tokens of padding (segment id 0) do not count. (The reference adds a second term on the
  mixers' attention outputs; its Mamba2 layers return none, so it cannot apply to a hybrid and
  is left out.)
- **Stage 2, end-to-end**: `kl_weight * KL(teacher || student) + ce_weight * CE` per token, on
  the tokens with loss weight; KL(p_t || p_s) = sum_v p_t (log p_t - log p_s). The reference's
  `F.kl_div(..., reduction="batchmean")` divides the sum over tokens by the number of rows, so
  its loss is this one times the sequence length (a constant factor).

The loss code asks nothing of the student's layer kinds: a block is applied through
`model.unstack` and `Block`, whatever its mixer. The teacher gets no gradients (its outputs are
`stop_gradient`ed and it is not an argument of the differentiated function) and shares the
student's mesh: its parameters are sharded by the same rules table.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxllama.block import Block
from jaxllama.config import ModelConfig
from jaxllama.layers.basic import Embed, RMSNorm, dtype_of
from jaxllama.model import Transformer, unstack
from jaxllama.sharding import batch_sharding, param_shardings, replicated, use_mesh
from jaxllama.training.config import DISTILL_STAGES
from jaxllama.training.loss import token_losses
from jaxllama.training.step import (
    BATCH_KEYS,
    TrainState,
    abstract_params,
    guarded_update,
    state_shardings,
)

STAGES = DISTILL_STAGES


def _kw(cfg: ModelConfig) -> dict:
    return {"dtype": dtype_of(cfg.dtype), "param_dtype": dtype_of(cfg.param_dtype)}


def embed(cfg: ModelConfig, params: dict, tokens):
    """tokens [B T] -> embeddings [B T D] (the input of layer 0)."""
    mod = Embed(cfg.vocab_size, cfg.hidden_size, **_kw(cfg))
    return mod.apply({"params": params["embed"]}, tokens)


def final_norm(cfg: ModelConfig, params: dict, x):
    return RMSNorm(cfg.rms_norm_eps, **_kw(cfg)).apply({"params": params["norm"]}, x)


def apply_layer(cfg: ModelConfig, layer_params: dict, layer: int, x, positions, segment_ids):
    """Block `layer` (its own kind) on x [B T D] -> [B T D], no cache."""
    block = Block(cfg, cfg.layer_pattern[layer])
    y, _ = block.apply({"params": layer_params}, x, positions, None, segment_ids)
    return y


def layer_states(cfg: ModelConfig, params: dict, tokens, positions, segment_ids=None):
    """(states [L+1 B T D], final-normed last state [B T D]): states[0] = the embeddings,
    states[l + 1] = the output of layer l (un-normed). Layers run one after another, so this is
    the model's own forward exposed layer by layer."""
    x = embed(cfg, params, tokens)
    states = [x]
    for layer, lp in enumerate(unstack(cfg, params)):
        x = apply_layer(cfg, lp, layer, x, positions, segment_ids)
        states.append(x)
    return jnp.stack(states), final_norm(cfg, params, x)


def layerwise_outputs(cfg: ModelConfig, params: dict, inputs, positions, segment_ids=None):
    """Each layer l on its own given input: inputs [L B T D] -> outputs [L B T D]."""
    return jnp.stack([apply_layer(cfg, lp, layer, inputs[layer], positions, segment_ids)
                      for layer, lp in enumerate(unstack(cfg, params))])


def _l2(a, b):
    """Per-token L2 norm of a - b over the last axis, float32 (floored inside the square root
    so that its gradient at a == b is 0 rather than NaN)."""
    d = (a.astype(jnp.float32) - b.astype(jnp.float32))
    return jnp.sqrt(jnp.maximum(jnp.sum(d * d, axis=-1), 1e-24))


def layerwise_loss_sums(student_cfg: ModelConfig, params: dict, teacher_cfg: ModelConfig,
                        teacher_params: dict, batch: dict, last_normed: bool = True):
    """Stage 1: (sum over real tokens of sum over layers of ||y_l - t_l||_2, real tokens).

    y_l = student layer l on the teacher's input of layer l; t_l = the teacher's output of
    layer l; with `last_normed` the last layer's pair is compared after each model's final
    norm. Real tokens: segment id != 0."""
    if student_cfg.num_layers != teacher_cfg.num_layers:
        raise ValueError(f"layer-wise distillation needs as many student layers "
                         f"({student_cfg.num_layers}) as teacher layers "
                         f"({teacher_cfg.num_layers})")
    states, t_final = layer_states(teacher_cfg, teacher_params, batch["inputs"],
                                   batch["positions"], batch["segment_ids"])
    states, t_final = jax.lax.stop_gradient((states, t_final))
    outs = layerwise_outputs(student_cfg, params, states[:-1], batch["positions"],
                             batch["segment_ids"])
    targets = states[1:]
    if last_normed:
        last = final_norm(student_cfg, params, outs[-1])
        per_layer = jnp.concatenate([_l2(outs[:-1], targets[:-1]),
                                     _l2(last, t_final)[None]])  # [L B T]
    else:
        per_layer = _l2(outs, targets)
    mask = (batch["segment_ids"] != 0).astype(jnp.float32)
    return jnp.sum(per_layer * mask), jnp.sum(mask)


def token_kl(student_logits, teacher_logits):
    """KL(p_teacher || p_student) per token [..] from float32 logits [.. V]."""
    lp_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    lp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lp_t) * (lp_t - lp_s), axis=-1)


def kl_loss_sums(student: Transformer, params: dict, teacher: Transformer, teacher_params: dict,
                 batch: dict, kl_weight: float = 1.0, ce_weight: float = 0.0, chunk: int = 0):
    """Stage 2: (sum_t w_t (kl_weight KL_t + ce_weight CE_t), sum_t w_t) over the batch.

    Like `loss.chunked_cross_entropy`, `chunk` tokens of both models' logits [B chunk V] are
    alive at a time (every (T / chunk)-th token per piece); 0 = all T at once."""
    args = (batch["inputs"], batch["positions"], None, batch["segment_ids"])
    h_t, _ = teacher.apply({"params": teacher_params}, *args, method=Transformer.hidden)
    h_t = jax.lax.stop_gradient(h_t)
    h_s, _ = student.apply({"params": params}, *args, method=Transformer.hidden)
    y, w = batch["targets"], batch["weights"].astype(jnp.float32)

    def piece(params, hs, ht, y, w):  # [B C D], [B C D], [B C], [B C]
        ls = student.apply({"params": params}, hs, method=Transformer.logits)
        lt = jax.lax.stop_gradient(
            teacher.apply({"params": teacher_params}, ht, method=Transformer.logits))
        loss = kl_weight * token_kl(ls, lt)
        if ce_weight:
            loss = loss + ce_weight * token_losses(ls, y)
        return jnp.sum(loss * w)

    b, t, _ = h_s.shape
    if chunk <= 0 or chunk >= t:
        return piece(params, h_s, h_t, y, w), jnp.sum(w)
    if t % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {t}")
    n = t // chunk
    split = lambda a: jnp.moveaxis(a.reshape((b, chunk, n) + a.shape[2:]), 2, 0)
    piece_ckpt = jax.checkpoint(piece)

    def body(total, xs):
        return total + piece_ckpt(params, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (split(h_s), split(h_t), split(y), split(w)))
    return total, jnp.sum(w)


def distill_loss_fn(student: Transformer, teacher: Transformer, stage: str, *,
                    kl_weight: float = 1.0, ce_weight: float = 0.0, loss_chunk: int = 0,
                    last_normed: bool = True) -> Callable:
    """`loss_sums(params, teacher_params, batch) -> (sum, count)` of one stage."""
    if stage not in STAGES:
        raise ValueError(f"distill stage {stage!r} is not one of {STAGES}")
    if stage == "layerwise":
        return lambda p, tp, b: layerwise_loss_sums(student.cfg, p, teacher.cfg, tp, b,
                                                    last_normed)
    return lambda p, tp, b: kl_loss_sums(student, p, teacher, tp, b, kl_weight, ce_weight,
                                         loss_chunk)


def distill_step(state: TrainState, teacher_params, batch: dict, *, loss_sums: Callable,
                 tx: optax.GradientTransformation):
    """One guarded optimizer update of the student on a distillation loss; gradients of the
    student only (the teacher's parameters are a plain argument, not differentiated). Metrics
    as `step.train_step`'s: loss, grad_norm, tokens, finite (an update with a non-finite loss,
    gradient norm or result is skipped inside the step, the state returned unchanged)."""
    (total, count), grads = jax.value_and_grad(loss_sums, has_aux=True)(
        state.params, teacher_params, batch)
    denom = jnp.maximum(count, 1.0)
    loss, grads = total / denom, jax.tree.map(lambda g: g / denom, grads)
    return guarded_update(state, tx, loss, count, grads)


def teacher_shardings(teacher: Transformer, mesh):
    """The teacher's parameter shardings on the student's mesh (the same rules table)."""
    return param_shardings(abstract_params(teacher), mesh)


def place_teacher(teacher: Transformer, params, mesh):
    """Host (or device) teacher params -> sharded device arrays in the teacher's dtype."""
    dtype = dtype_of(teacher.cfg.param_dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return jax.device_put(params, teacher_shardings(teacher, mesh))


def compile_distill_step(student: Transformer, teacher: Transformer, teacher_params, tx, mesh,
                         stage: str, **loss_kw) -> Callable[[TrainState, dict], tuple]:
    """`step(state, batch) -> (state, metrics)` like `step.compile_train_step`, with the placed
    teacher params (`place_teacher`) bound; the state is donated, the teacher is not."""
    loss_sums = distill_loss_fn(student, teacher, stage, **loss_kw)
    sh = state_shardings(student, tx, mesh)
    t_sh = teacher_shardings(teacher, mesh)
    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    fn = jax.jit(lambda s, tp, b: distill_step(s, tp, b, loss_sums=loss_sums, tx=tx),
                 in_shardings=(sh, t_sh, batch_sh), out_shardings=(sh, replicated(mesh)),
                 donate_argnums=0)

    def step(state, batch):
        with use_mesh(mesh):
            return fn(state, teacher_params, batch)

    step.jitted = fn
    return step


def load_teacher(cfg, student: Transformer, mesh) -> tuple[Transformer, dict]:
    """The teacher of a run (`cfg.distill.teacher`, any `init.checkpoint` source), computing in
    `train.compute_dtype` and stored in it, placed on the student's mesh."""
    from jaxllama.checkpoint import load_checkpoint
    from jaxllama.config import ConfigError

    where = cfg.source or "config"
    path = None if cfg.distill.teacher == "embedded" else cfg.distill.teacher
    ck = load_checkpoint(path, "float32")
    dtype = cfg.train.compute_dtype
    teacher = Transformer(ck.config.replace(dtype=dtype, param_dtype=dtype))
    if ck.config.vocab_size != student.cfg.vocab_size:
        raise ConfigError(f"{where}: distill.teacher: vocabulary {ck.config.vocab_size} differs "
                          f"from the student's {student.cfg.vocab_size}")
    if cfg.distill.stage == "layerwise" and ck.config.num_layers != student.cfg.num_layers:
        raise ConfigError(f"{where}: distill.stage: layerwise needs as many teacher layers "
                          f"({ck.config.num_layers}) as student layers "
                          f"({student.cfg.num_layers})")
    return teacher, place_teacher(teacher, ck.params, mesh)


def compile_for_run(cfg, student: Transformer, tx, mesh) -> Callable:
    """The trainer's step when `cfg.distill` is set (train.grad_accum must be 1)."""
    from jaxllama.config import ConfigError

    if cfg.train.grad_accum != 1:
        raise ConfigError(f"{cfg.source or 'config'}: train.grad_accum: distillation runs "
                          "without gradient accumulation (set 1)")
    d = cfg.distill
    teacher, teacher_params = load_teacher(cfg, student, mesh)
    return compile_distill_step(student, teacher, teacher_params, tx, mesh, d.stage,
                                kl_weight=d.kl_weight, ce_weight=d.ce_weight,
                                loss_chunk=cfg.train.loss_chunk, last_normed=d.last_normed)


__all__ = ["STAGES", "compile_distill_step", "compile_for_run", "distill_loss_fn", "distill_step",
           "kl_loss_sums", "layer_states", "layerwise_loss_sums", "layerwise_outputs",
           "load_teacher", "place_teacher", "token_kl"]
