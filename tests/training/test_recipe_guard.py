"""Guarded steps inside a recipe: every stage trains through the trainer's own loop, so a NaN
batch in a stage is skipped and logged with its step number, and `train.max_bad_steps` bad steps
in a row stop the recipe with the trainer's one-line error: the stage neither exports nor hands
over to the next stage, and its last checkpoint is its last good step."""

import logging
from pathlib import Path

import pytest

from jaxllama.training import trainer
from jaxllama.training.recipe import load_recipe, run_recipe
from tests.training.test_guarded_steps import _PoisonedLoader

ROOT = Path(__file__).resolve().parents[2]


class _StageLoader(_PoisonedLoader):
    POISONED = (1, 3, 4)  # batches served by the stage's loader: 1 alone, then 3 and 4 in a row


def test_recipe_stage_skips_logs_and_stops_on_bad_steps(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(trainer, "DataLoader", _StageLoader)
    (tmp_path / "recipe.yaml").write_text(
        f"output_dir: {tmp_path}/out\nbase: configs/train/tiny.yaml\nstages:\n"
        "  - {name: a, seq_len: 32, rope_theta: 10000, steps: 4, lr: 3.0e-3}\n"
        "  - {name: b, seq_len: 64, rope_theta: 40000, steps: 2, lr: 2.0e-3}\n")
    recipe = load_recipe(tmp_path / "recipe.yaml", [
        "base.log.tensorboard=false", "base.train.max_bad_steps=2", "base.checkpoint.every=1",
        "base.checkpoint.keep=10",
        # the loop is under test, not ring attention: a data-parallel mesh, no remat
        "base.mesh.data=8", "base.mesh.seq=1", "base.model.kernels.context_parallel=none",
        "base.train.batch_size=8", "base.model.kernels.remat=none"])
    with (caplog.at_level(logging.WARNING, logger="jaxllama.training.trainer"),
          pytest.raises(trainer.DivergedError) as err):
        run_recipe(recipe)
    assert str(err.value) == ("step 4: 2 consecutive steps with a non-finite loss or gradient "
                              "norm (train.max_bad_steps=2); last good checkpoint: step 2")
    warned = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert [w.split(":")[0] for w in warned] == ["step 1", "step 3", "step 4"]
    out = tmp_path / "out"
    ckpt = trainer.CheckpointManager(out / "a" / "checkpoints")
    assert ckpt.all_steps() == [2]  # the one good step; no checkpoint of a skipped step
    ckpt.close()
    assert not (out / "a" / "final").exists() and not (out / "b").exists()
