"""Progressive context extension: the full-scale Llama-3-8B 1048K recipe validates with
jax.eval_shape; the tiny recipe runs two stages, the second from the first's weights."""

import dataclasses
from pathlib import Path

import jax
import numpy as np

from jaxllama.checkpoint import load_checkpoint
from jaxllama.model import Transformer
from jaxllama.training.data import DataLoader
from jaxllama.training.recipe import load_recipe, run_recipe, stage_config, validate_recipe
from jaxllama.training.step import loss_sums

ROOT = Path(__file__).resolve().parents[2]


def test_llama3_8b_1048k_recipe_validates():
    recipe = load_recipe(ROOT / "configs/recipes/llama3-8b-gradient-1048k.yaml")
    assert [s.seq_len for s in recipe.stages] == [2 ** 16, 2 ** 18, 2 ** 19, 2 ** 20]
    assert [s.rope_theta for s in recipe.stages] == [15_296_098, 207_112_184, 1_062_356_830,
                                                     2_804_339_835]
    assert [s.steps for s in recipe.stages] == [30, 24, 50, 50]
    assert {s.lr for s in recipe.stages} == {2e-5}
    lines = validate_recipe(recipe)
    for line, tokens in zip(lines, ["62.9M", "100.7M", "419.4M", "838.9M"]):
        assert f"= {tokens} tokens" in line and "8.03B params" in line and line.endswith("ok")
    cfg = stage_config(recipe, 3)
    assert cfg.init.checkpoint.endswith("524k/final")
    assert cfg.model["attention"]["rope"]["theta"] == 2_804_339_835
    assert cfg.model["max_position_embeddings"] == 2 ** 20


def test_tiny_recipe_stages_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    # data-parallel only here: ring attention has its own tests, and two more ring compiles
    # would double this test's time
    recipe = load_recipe("configs/recipes/tiny.yaml", [
        f"output_dir={tmp_path}", "base.log.tensorboard=false", "base.mesh.data=8",
        "base.mesh.seq=1", "base.model.kernels.context_parallel=none", "base.train.batch_size=8",
        "base.model.kernels.remat=none"])
    out = run_recipe(recipe)
    assert [s["stage"] for s in out["stages"]] == ["s32", "s64"] and out["stopped"] is None
    first = load_checkpoint(str(tmp_path / "s32" / "final"))
    second = load_checkpoint(str(tmp_path / "s64" / "final"))
    assert first.config.attention.rope.theta == 10000 and second.config.attention.rope.theta == 40000
    assert second.config.max_position_embeddings == 256
    # stage 2 started from stage 1's weights with the new theta: its first logged loss is the
    # loss of stage 1's final model (theta 40000) on stage 2's first batch
    cfg2 = stage_config(recipe, 1)
    start = load_checkpoint(str(tmp_path / "s32" / "final"),
                            overrides=["model.attention.rope.theta=40000"])
    model = Transformer(dataclasses.replace(start.config, kernels=dataclasses.replace(
        start.config.kernels, context_parallel="none")))
    batch = next(DataLoader(cfg2.data, start.tokenizer, 64, 8, eos=256))
    total, count = jax.jit(lambda p, b: loss_sums(p, model, b, 0))(start.params, batch)
    logged = [float(ln.split('"loss": ')[1].split(",")[0])
              for ln in (tmp_path / "s64" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(logged[0], total / count, rtol=1e-5)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params))]
    assert min(moved) > 0
    # a finished recipe is skipped on rerun
    again = run_recipe(recipe)
    assert all(s.get("skipped") for s in again["stages"])
