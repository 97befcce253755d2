"""Guarded steps: a batch that makes the loss non-finite is skipped inside the jitted step (state
unchanged, flagged in the metrics), logged by the loop with its step number, never checkpointed,
and `train.max_bad_steps` of them in a row stop the run with a one-line error."""

import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllama.config import AttentionConfig, ModelConfig
from jaxllama.model import Transformer
from jaxllama.sharding import make_mesh
from jaxllama.training import trainer
from jaxllama.training.config import load_train_config
from jaxllama.training.optimizer import lr_schedule, make_optimizer
from jaxllama.training.step import compile_train_step, init_state

ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                  layer_pattern=("dense",) * 2,
                  attention=AttentionConfig(num_heads=4, num_kv_heads=2))


def _batch(rng, b=2, t=16):
    return {"inputs": rng.integers(0, 64, (b, t)).astype(np.int32),
            "targets": rng.integers(0, 64, (b, t)).astype(np.int32),
            "weights": np.ones((b, t), np.float32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, t), np.int32)}


def test_nan_batch_leaves_state_unchanged():
    model = Transformer(CFG)
    mesh = make_mesh({}, jax.devices()[:1])
    tx = make_optimizer(lr_schedule(1e-2, 10, 0))
    step = compile_train_step(model, tx, mesh, loss_chunk=8)
    state = init_state(model, tx, mesh, jax.random.key(0))
    rng = np.random.default_rng(0)
    good, bad = _batch(rng), _batch(rng)
    bad["weights"][1, 5] = np.nan  # one poisoned loss weight: loss and every gradient are NaN
    before = jax.device_get(state)  # the step donates its input state
    state, m = step(state, bad)
    assert not bool(m["finite"]) and np.isnan(float(m["loss"]))
    after = jax.device_get(state)
    assert int(after.step) == int(before.step) == 0
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)  # params and optimizer state untouched, bit for bit
    state, m = step(state, good)
    assert bool(m["finite"]) and np.isfinite(float(m["loss"]))
    assert int(state.step) == 1
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), jax.device_get(state.params),
                         before.params)
    assert min(jax.tree.leaves(moved)) > 0


class _PoisonedLoader(trainer.DataLoader):
    """The tiny run's loader with NaN loss weights in the batches of `POISONED` steps."""

    POISONED = (3, 5, 6)

    def __next__(self):
        batch = super().__next__()
        self.served = getattr(self, "served", 0) + 1
        if self.served in self.POISONED:
            batch = dict(batch, weights=np.where(batch["weights"] > 0, np.nan, 0.0)
                         .astype(np.float32))
        return batch


def test_bad_steps_are_skipped_logged_and_stop_the_run(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(trainer, "DataLoader", _PoisonedLoader)
    cfg = load_train_config("configs/train/tiny.yaml", [
        "train.steps=8", "train.max_bad_steps=2", f"checkpoint.dir={tmp_path}/ckpt",
        "checkpoint.every=1", "checkpoint.keep=10", f"log.dir={tmp_path}",
        "log.tensorboard=false",
        # a plain data-parallel mesh: this test is about the loop, not about ring attention
        "mesh.data=8", "mesh.seq=1", "train.batch_size=8", "model.kernels.context_parallel=none"])
    with (caplog.at_level(logging.WARNING, logger="jaxllama.training.trainer"),
          pytest.raises(trainer.DivergedError) as err):
        trainer.run(cfg)
    # step 3 is skipped alone (the run goes on), steps 5 and 6 in a row reach the limit
    assert str(err.value) == ("step 6: 2 consecutive steps with a non-finite loss or gradient "
                              "norm (train.max_bad_steps=2); last good checkpoint: step 4")
    warned = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert [w.split(":")[0] for w in warned] == ["step 3", "step 5", "step 6"]
    ckpt = trainer.CheckpointManager(tmp_path / "ckpt")
    assert ckpt.all_steps() == [1, 2, 4]  # no checkpoint of a skipped step
    rows = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # metrics of the good steps only
    ckpt.close()
