"""Train state, the jitted train step, and their shardings on a mesh.

Mixed precision: parameters and optimizer state are float32 master copies; the model computes in
`ModelConfig.dtype` (bfloat16 for mixed precision) because every layer casts its weights to the
compute dtype, so gradients arrive in float32. Rematerialisation follows `KernelConfig.remat`.

A batch is a dict of [B T] arrays: `inputs`, `targets` (int32), `weights` (float32 loss weights:
0 for prompt, padding and memory tokens), `positions` and `segment_ids` (int32, per document).
Gradient accumulation splits B into `grad_accum` micro-batches (every `grad_accum`-th row, so each
micro-batch stays spread over the data axis) and sums token-loss sums and gradients before one
division by the global token count: the update equals the one-shot step up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxllama.model import Transformer
from jaxllama.sharding import (
    batch_sharding,
    mesh_axis_size,
    opt_state_shardings,
    param_shardings,
    replicated,
    use_mesh,
)
from jaxllama.training.loss import chunked_cross_entropy

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


def loss_sums(params, model: Transformer, batch: dict, loss_chunk: int):
    """(sum of weighted token losses, sum of weights) for one (micro-)batch."""
    hidden, _ = model.apply({"params": params}, batch["inputs"], batch["positions"], None,
                            batch["segment_ids"], method=Transformer.hidden)
    return chunked_cross_entropy(model, params, hidden, batch["targets"], batch["weights"],
                                 loss_chunk)


def loss_and_grads(params, model: Transformer, batch: dict, loss_chunk: int = 0,
                   grad_accum: int = 1):
    """(mean token loss, token count, gradients of the mean loss) over the whole batch."""
    grad_fn = jax.value_and_grad(lambda p, b: loss_sums(p, model, b, loss_chunk), has_aux=True)
    if grad_accum == 1:
        (total, count), grads = grad_fn(params, batch)
    else:
        ways = mesh_axis_size("data") * mesh_axis_size("fsdp")
        rows = batch["inputs"].shape[0]
        if rows % (grad_accum * ways):
            # an unevenly sharded micro-batch is padded by XLA, and the padding rows' embedding
            # gradients land in row 0 of the table: refuse instead of training on garbage
            raise ValueError(f"batch {rows} is not divisible by grad_accum {grad_accum} x "
                             f"data x fsdp {ways}")

        def micro(a):  # [B ..] -> [A B/A ..]: micro-batch j = rows j, j + A, ...
            return jnp.swapaxes(a.reshape((a.shape[0] // grad_accum, grad_accum) + a.shape[1:]),
                                0, 1)

        def body(acc, mb):
            (s, n), g = grad_fn(params, mb)
            return jax.tree.map(jnp.add, acc, (s, n, g)), None

        zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                jax.tree.map(jnp.zeros_like, params))
        (total, count, grads), _ = jax.lax.scan(body, zero, jax.tree.map(micro, batch))
    denom = jnp.maximum(count, 1.0)
    return total / denom, count, jax.tree.map(lambda g: g / denom, grads)


def train_step(state: TrainState, batch: dict, *, model: Transformer,
               tx: optax.GradientTransformation, loss_chunk: int = 0, grad_accum: int = 1):
    """One guarded optimizer update. Returns (new state, metrics: loss, grad_norm, tokens, finite).

    `finite` (bool scalar) is False when the loss, the gradient norm or the updated parameters are
    not all finite; the update is then skipped inside the step (state returned unchanged, step
    counter included), so a non-finite state never exists and the check costs no host sync of its
    own: the flag travels with the metrics the loop already fetches."""
    loss, count, grads = loss_and_grads(state.params, model, batch, loss_chunk, grad_accum)
    return guarded_update(state, tx, loss, count, grads)


def guarded_update(state: TrainState, tx: optax.GradientTransformation, loss, count, grads):
    """The update of `train_step` (and of `distill.distill_step`) from a mean loss, its token
    count and its gradients: skipped inside the step (state unchanged) unless the loss, gradient
    norm and updated parameters are all finite. Returns (new state, metrics)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
    new = TrainState(state.step + 1, params, opt_state)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}
    return new, metrics


def abstract_params(model: Transformer, seq_len: int = 8):
    """Boxed parameter shapes (with logical axis metadata), no memory used."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def state_shardings(model: Transformer, tx, mesh) -> TrainState:
    """NamedShardings of every TrainState leaf, from the one rules table."""
    boxed = abstract_params(model)
    p_sh = param_shardings(boxed, mesh)
    opt_shapes = jax.eval_shape(tx.init, nn.meta.unbox(boxed))
    return TrainState(step=replicated(mesh), params=p_sh,
                      opt_state=opt_state_shardings(tx, opt_shapes, p_sh, mesh))


def init_state(model: Transformer, tx, mesh, rng=None, params=None) -> TrainState:
    """A sharded TrainState: random init from `rng`, or the given (host or device) `params`."""
    sh = state_shardings(model, tx, mesh)
    # no mesh context while tracing init: a 1 x 8 dummy batch need not fit the seq axis
    if params is None:
        init = lambda r: nn.meta.unbox(
            model.init(r, jnp.zeros((1, 8), jnp.int32))["params"])
        params = jax.jit(init, out_shardings=sh.params)(rng)
    else:
        params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params),
                                sh.params)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def compile_train_step(model: Transformer, tx, mesh, *, loss_chunk: int = 0,
                       grad_accum: int = 1) -> Callable[[TrainState, dict], tuple]:
    """`step(state, batch) -> (state, metrics)`, jitted with shardings from the rules table; the
    state is donated. Batches are dicts of `BATCH_KEYS` arrays sharded with `batch_sharding`."""
    sh = state_shardings(model, tx, mesh)
    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    fn = jax.jit(
        lambda s, b: train_step(s, b, model=model, tx=tx, loss_chunk=loss_chunk,
                                grad_accum=grad_accum),
        in_shardings=(sh, batch_sh), out_shardings=(sh, replicated(mesh)), donate_argnums=0)

    def step(state, batch):
        with use_mesh(mesh):  # constraints and context parallelism read the mesh while tracing
            return fn(state, batch)

    step.jitted = fn
    return step
