"""The training run: config -> model, mesh, data, state -> steps -> checkpoints and exports.

Order of work: the config is validated against the device count first (one-line errors, nothing
loaded); then the model (from a checkpoint, preset or inline config) and tokenizer; then the mesh,
the optimizer and the state (restored from the latest readable checkpoint when there is one, with
the data loader's position); then the loop. SIGTERM / SIGINT set a flag: the current step ends,
a checkpoint is written, and `run` returns `stopped=True` (a second SIGINT interrupts at once).
Multi-process runs (`distributed.coordinator`) agree on stopping through a tiny all-gather.

Guarded steps: the jitted step skips an update whose loss, gradient norm or new parameters are not
finite (`step.train_step`) and says so in its `finite` metric; the loop logs each skipped step,
writes no checkpoint for it, and after `train.max_bad_steps` in a row raises `DivergedError`
(pending checkpoint saves finish first, so the last good checkpoint stays the newest).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllama.config import ConfigError, ModelConfig, to_dict
from jaxllama.model import Transformer
from jaxllama.sharding import batch_sharding, make_mesh
from jaxllama.training.checkpointing import CheckpointManager
from jaxllama.training.config import (
    DistributedConfig,
    TrainConfig,
    check_against_devices,
    flatten_overrides,
    resolve_model_config,
    with_training_dtypes,
)
from jaxllama.training.data import DataLoader, check_packing, eos_id, load_tokenizer
from jaxllama.training.metrics import MetricsLog, flops_per_token, peak_flops
from jaxllama.training.optimizer import lr_schedule, make_optimizer
from jaxllama.training.step import BATCH_KEYS, TrainState, compile_train_step, init_state

log = logging.getLogger(__name__)


def init_distributed(cfg: DistributedConfig) -> None:
    """`jax.distributed.initialize` for multi-process runs (gloo collectives on CPU)."""
    if cfg.coordinator is None or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg.coordinator,
                               num_processes=cfg.num_processes, process_id=cfg.process_id)


class DivergedError(RuntimeError):
    """`train.max_bad_steps` consecutive steps had a non-finite loss or gradient norm."""


class StopFlag:
    """SIGTERM / SIGINT request a clean stop after the current step."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all processes must leave the loop together)."""
        if jax.process_count() == 1:
            return self.signal is not None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
        return bool(np.any(flags))


@dataclasses.dataclass
class ModelBundle:
    config: ModelConfig
    params: Any  # host params, or None for random init
    tokenizer: Any
    generation_config: dict


def load_model(cfg: TrainConfig) -> ModelBundle:
    """Model config, initial params (None = random), tokenizer, generation config."""
    if cfg.init.checkpoint:
        from jaxllama.checkpoint import load_checkpoint

        path = None if cfg.init.checkpoint == "embedded" else cfg.init.checkpoint
        ck = load_checkpoint(path, "float32", overrides=flatten_overrides(cfg.model))
        bundle = ModelBundle(with_training_dtypes(ck.config, cfg), ck.params,
                             load_tokenizer(cfg.data.tokenizer, ck.tokenizer),
                             dict(ck.generation_config))
    else:
        tok = load_tokenizer(cfg.data.tokenizer)
        gen = {"eos_token_ids": [eos_id(tok)], "bos_token_id": tok.bos_token_id,
               "pad_token_id": tok.pad_token_id}
        bundle = ModelBundle(resolve_model_config(cfg), None, tok, gen)
    if cfg.data.memory_tokens is not None and cfg.data.memory_tokens.token_id < 0:
        from jaxllama.memory_tokens import ensure_memory_token

        if bundle.params is None and bundle.tokenizer.convert_tokens_to_ids("<|memory|>") is None:
            raise ConfigError("data.memory_tokens: the tokenizer has no <|memory|> token")
        if bundle.params is not None:
            mt = ensure_memory_token(bundle.tokenizer, bundle.params, bundle.config)
            bundle.params, bundle.config = mt.params, mt.config
    if len(bundle.tokenizer) > bundle.config.vocab_size:
        raise ConfigError(f"{cfg.source}: model.vocab_size: {bundle.config.vocab_size} is smaller "
                          f"than the tokenizer's {len(bundle.tokenizer)} tokens")
    return bundle


def _check_packing(cfg: TrainConfig, model: ModelConfig) -> None:
    """data.packing against the model's FoT cross-batch range (training/data.py)."""
    d = model.fot.cross_batch_range if model.fot is not None else 0
    try:
        check_packing(cfg.data, d, cfg.train.batch_size, cfg.train.grad_accum,
                      jax.process_count())
    except ConfigError as e:
        raise ConfigError(f"{cfg.source or 'config'}: {e}") from None


def _memory_token_id(tokenizer) -> int | None:
    tid = tokenizer.convert_tokens_to_ids("<|memory|>")
    return None if tid is None or tid == getattr(tokenizer, "unk_token_id", -1) else int(tid)


def _host_params(params):
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params)


def export(cfg: TrainConfig, bundle: ModelBundle, params) -> None:
    """Write the trained model as an HF directory and/or a jaxllama orbax directory."""
    targets = [(cfg.checkpoint.export_hf, "hf"), (cfg.checkpoint.export_orbax, "orbax")]
    if not any(t for t, _ in targets):
        return
    host = _host_params(params)
    if jax.process_index() != 0:
        return
    from jaxllama.checkpoint import save_hf, save_orbax

    config = bundle.config.replace(dtype="float32", param_dtype="float32")
    for out, kind in targets:
        if out:
            save = save_hf if kind == "hf" else save_orbax
            save(config, host, bundle.tokenizer, out, bundle.generation_config, overwrite=True)
            log.info("exported %s model to %s", kind, out)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train per `cfg`. Returns {step, loss, losses: {step: loss}, stopped: signal name or None,
    complete: True when the checkpoint directory already held a run of `train.steps` steps (then
    nothing is trained and loss is None)}."""
    init_distributed(cfg.distributed)
    log.info("loading the model and the tokenizer")
    bundle = load_model(cfg)  # the resolved model config decides the zigzag sequence layout
    sizes = check_against_devices(cfg, jax.device_count(), jax.process_count(),
                                  bundle.config.kernels.context_parallel)
    _check_packing(cfg, bundle.config)
    mesh = make_mesh(cfg.mesh)
    model = Transformer(bundle.config)
    t = cfg.train
    schedule = lr_schedule(t.lr, t.steps, t.warmup_steps, t.schedule, t.min_lr_ratio)
    tx = make_optimizer(schedule, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps,
                        clip_norm=t.clip_norm or None)
    seq_ways = sizes["seq"] if bundle.config.kernels.context_parallel != "none" else 1
    loader = DataLoader(cfg.data, bundle.tokenizer, t.seq_len, t.batch_size,
                        eos=eos_id(bundle.tokenizer, bundle.generation_config),
                        process_index=jax.process_index(), process_count=jax.process_count(),
                        seq_ways=seq_ways, memory_token_id=_memory_token_id(bundle.tokenizer),
                        grad_accum=t.grad_accum)
    ckpt = None
    if cfg.checkpoint.dir:
        c = cfg.checkpoint
        ckpt = CheckpointManager(c.dir, c.every, c.keep, c.async_save)
    log.info("setting up the train state on mesh %s", sizes)
    state, start = _initial_state(cfg, model, tx, mesh, bundle, ckpt, loader)
    if start >= t.steps:  # a finished run: nothing to train (and nothing to compile)
        ckpt.close()
        if any(p and not Path(p).exists() for p in (cfg.checkpoint.export_hf,
                                                    cfg.checkpoint.export_orbax)):
            export(cfg, bundle, state.params)  # a run cut short while exporting
        return {"step": start, "loss": None, "losses": {}, "stopped": None, "complete": True,
                "steps": t.steps}
    log.info("compiling the train step (the first step waits for it)")
    if cfg.distill is not None:  # a teacher and a distillation loss (training/distill.py)
        from jaxllama.training.distill import compile_for_run
        step_fn = compile_for_run(cfg, model, tx, mesh)
    else:
        step_fn = compile_train_step(model, tx, mesh, loss_chunk=t.loss_chunk,
                                     grad_accum=t.grad_accum)
    log_dir = cfg.log.dir or cfg.checkpoint.dir
    metrics = MetricsLog(log_dir, total_steps=t.steps, start_step=start,
                         tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                         enabled=jax.process_index() == 0)
    try:
        with StopFlag() as stop:
            state, out = _loop(cfg, bundle, state, start, step_fn, loader, ckpt, metrics, stop,
                               schedule, mesh)
    except DivergedError:
        if ckpt is not None:
            ckpt.close()  # finish the pending saves of good steps; write nothing new
        raise
    finally:
        metrics.close()
    if ckpt is not None:
        meta = {"loss": out["loss"], "model": to_dict(bundle.config)}
        ckpt.save(out["step"], state, loader.get_state(), meta, force=True)
        ckpt.close()
    if out["stopped"] is None:
        export(cfg, bundle, state.params)
    return out


def _initial_state(cfg, model, tx, mesh, bundle, ckpt, loader) -> tuple[TrainState, int]:
    from jaxllama.training.step import state_shardings

    if ckpt is not None and cfg.checkpoint.resume and ckpt.all_steps():
        sh = state_shardings(model, tx, mesh)
        shapes = jax.eval_shape(lambda: init_state_shapes(model, tx))
        abstract = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d),
                                shapes, sh)
        restored = ckpt.restore_latest(abstract)
        if restored is not None:
            step, state, data_state, _ = restored
            loader.set_state(data_state)
            log.info("resumed from %s step %d", ckpt.directory, step)
            return state, step
    rng = jax.random.key(cfg.init.seed)
    return init_state(model, tx, mesh, rng, bundle.params), 0


def init_state_shapes(model, tx) -> TrainState:
    """Traceable constructor of an unsharded TrainState (for eval_shape)."""
    import flax.linen as nn
    import jax.numpy as jnp

    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _loop(cfg, bundle, state, step, step_fn, loader, ckpt, metrics, stop, schedule, mesh):
    t = cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    flops_tok = flops_per_token(bundle.config, t.seq_len)
    peak, _ = peak_flops(cfg.log.peak_tflops)
    bsh = batch_sharding(mesh)
    losses: dict[int, float] = {}
    stopped = None
    bad = 0  # consecutive skipped (non-finite) steps
    while step < t.steps:
        if stop.agreed():
            stopped = stop.signal or "signal on another process"
            break
        local = next(loader)
        batch = {k: jax.make_array_from_process_local_data(bsh, local[k]) for k in BATCH_KEYS}
        t0 = time.perf_counter()
        state, m = step_fn(state, batch)
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        step += 1
        loss = float(m["loss"])
        if not bool(m["finite"]):
            bad += 1
            log.warning("step %d: non-finite loss %s or gradient norm %s; update skipped (%d in a "
                        "row, limit train.max_bad_steps=%d)", step, loss, float(m["grad_norm"]),
                        bad, t.max_bad_steps)
            if bad >= t.max_bad_steps:
                if ckpt is not None:
                    ckpt.wait()
                last = ckpt.all_steps()[-1] if ckpt is not None and ckpt.all_steps() else None
                kept = f"; last good checkpoint: step {last}" if last is not None else ""
                raise DivergedError(f"step {step}: {bad} consecutive steps with a non-finite loss "
                                    f"or gradient norm (train.max_bad_steps={t.max_bad_steps})"
                                    f"{kept}")
            continue
        bad = 0
        losses[step] = loss
        tok_s = tokens_per_step / dt
        row = {"loss": loss, "lr": float(schedule(step - 1)), "grad_norm": float(m["grad_norm"]),
               "loss_tokens": float(m["tokens"]), "tokens_per_s": tok_s, "step_time_s": dt,
               "mfu": flops_tok * tok_s / peak if peak else 0.0}
        if step % cfg.log.every == 0 or step == t.steps:
            metrics.write(step, row)
        if ckpt is not None:
            ckpt.save(step, state, loader.get_state(),
                      {"loss": loss, "model": to_dict(bundle.config)})
        if step == cfg.checkpoint.preempt_at_step:  # the real signal path, at a known step
            os.kill(os.getpid(), getattr(signal, cfg.checkpoint.preempt_signal))
    return state, {"step": step, "loss": losses.get(step), "losses": losses, "stopped": stopped,
                   "complete": False}


def output_paths(cfg: TrainConfig) -> list[Path]:
    """Directories a run writes (for messages)."""
    return [Path(p) for p in (cfg.checkpoint.dir, cfg.log.dir, cfg.checkpoint.export_hf,
                              cfg.checkpoint.export_orbax) if p]
