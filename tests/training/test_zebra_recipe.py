"""The Zebra-Llama recipe: hybridize -> stage 1 (layer-wise ILD) -> stage 2 (KL + CE), chained
through orbax `final/` directories, on a tiny random teacher; a rerun skips finished stages and
a stage whose export is missing is finished from its checkpoint without training again."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxllama.checkpoint import load_checkpoint, save_hf
from jaxllama.config import AttentionConfig, ConfigError, ModelConfig
from jaxllama.model import Transformer, init_params
from jaxllama.training.data import DataLoader, byte_tokenizer, eos_id
from jaxllama.training.distill import distill_loss_fn
from jaxllama.training.recipe import load_recipe, run_recipe, stage_config, validate_recipe
from jaxllama.training.trainer import _memory_token_id

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64,
                      layer_pattern=("dense", "dense"), max_position_embeddings=64,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2))
HYBRIDIZE = {"mla_layers": [0], "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 4,
             "qk_rope_head_dim": 4, "seed": 1}


def _recipe(tmp_path: Path, teacher: Path, **hybridize) -> Path:
    data = {
        "output_dir": str(tmp_path / "run"),
        "base": {
            "model": {"max_position_embeddings": 64},
            "distill": {"teacher": str(teacher)},
            "data": {"paths": [str(ROOT / "tests/training/data/tiny_corpus.txt")],
                     "doc_separator": "\n\n", "tokenizer": "checkpoint"},
            "train": {"batch_size": 8, "warmup_steps": 0, "compute_dtype": "float32",
                      "schedule": "constant", "weight_decay": 0.0},
            "checkpoint": {"every": 3, "keep": 1, "async_save": False},
            "log": {"progress": False, "tensorboard": False},
        },
        "stages": [
            {"name": "hybridize", "kind": "hybridize",
             "hybridize": {"input": str(teacher), **HYBRIDIZE, **hybridize}},
            {"name": "ild", "seq_len": 32, "steps": 3, "lr": 3e-3,
             "overrides": ["distill.stage=layerwise"]},
            {"name": "kl", "seq_len": 32, "steps": 3, "lr": 1e-3,
             "overrides": ["distill.stage=kl", "distill.ce_weight=0.5"]},
        ],
    }
    path = tmp_path / "zebra.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A random tiny Llama (byte vocabulary) as an HF directory; its LM head scaled up so its
    next-token distributions are peaked (a random init's are nearly uniform)."""
    params = jax.jit(lambda k: init_params(TEACHER, k))(jax.random.key(0))
    params = {**params, "lm_head": {"kernel": 20.0 * params["lm_head"]["kernel"]}}
    out = tmp_path_factory.mktemp("teacher") / "hf"
    save_hf(TEACHER, params, byte_tokenizer(), out,
            {"eos_token_ids": [256], "bos_token_id": 257, "pad_token_id": 258})
    return out


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in
            (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_chain_runs_resumes_and_skips(tmp_path, teacher):
    recipe = load_recipe(_recipe(tmp_path, teacher))
    lines = validate_recipe(recipe)  # the hybrid's shapes, before anything is written
    assert lines[0].startswith("stage hybridize: hybridize to 2 layers (mamba2, mla)")
    assert all(line.endswith("ok") for line in lines) and len(lines) == 3
    out = run_recipe(recipe)
    assert [s["stage"] for s in out["stages"]] == ["hybridize", "ild", "kl"]
    assert not any(s.get("skipped") for s in out["stages"]) and not out["complete"]
    run = tmp_path / "run"
    finals = [load_checkpoint(str(run / s / "final")) for s in ("hybridize", "ild", "kl")]
    for ck in finals:
        assert ck.config.layer_pattern == ("mla", "mamba2")
        assert ck.config.max_position_embeddings == 64  # the recipe's context, not seq_len
    # stage 1 started from the hybridize output against the teacher: its first logged loss
    # is the layer-wise loss of that output on stage 1's first batch
    cfg1 = stage_config(recipe, 1)
    start, t = finals[0], load_checkpoint(str(teacher))
    batch = next(DataLoader(cfg1.data, start.tokenizer, 32, 8,
                            eos=eos_id(start.tokenizer, start.generation_config),
                            memory_token_id=_memory_token_id(start.tokenizer)))
    loss = distill_loss_fn(Transformer(start.config), Transformer(t.config), "layerwise")
    total, count = jax.jit(loss)(start.params, t.params, batch)
    np.testing.assert_allclose(_losses(run / "ild")[0], total / count, rtol=1e-5)
    assert len(_losses(run / "kl")) == 3
    for a, b in itertools.pairwise(finals):  # each stage trained its start
        moved = [np.abs(np.asarray(x) - np.asarray(y)).max()
                 for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))]
        assert max(moved) > 0
    # a rerun trains nothing
    again = run_recipe(recipe)
    assert all(s.get("skipped") for s in again["stages"]) and again["complete"]
    # stage 2 cut short after its last checkpoint, before its export: finished, not retrained
    shutil.rmtree(run / "kl" / "final")
    resumed = run_recipe(recipe)
    assert [s.get("skipped", False) for s in resumed["stages"]] == [True, True, False]
    assert resumed["stages"][2]["complete"] and len(_losses(run / "kl")) == 3
    redone = load_checkpoint(str(run / "kl" / "final"))
    for x, y in zip(jax.tree.leaves(finals[2].params), jax.tree.leaves(redone.params)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("change", "message"), [
    ({"stages[0].kind": "convert"}, "kind: 'convert' is not one of"),
    ({"stages[0].steps": 5}, "stages[hybridize].steps: a hybridize stage trains nothing"),
    ({"stages[0].hybridize.kv_lora_rank": None}, "hybridize.kv_lora_rank: required"),
    ({"stages[0].hybridize.ranks": 3}, "stages[hybridize].hybridize.ranks: unknown key"),
    ({"stages[0].hybridize.preset": "zebra-llama-1b-8mla-8m2"},
     "give exactly one of mla_layers and preset"),
    ({"stages[1].hybridize": {"mla_layers": [0]}}, "only a stage of kind hybridize takes it"),
])
def test_bad_hybridize_stages_are_one_line(tmp_path, teacher, change, message):
    path = _recipe(tmp_path, teacher)
    data = yaml.safe_load(path.read_text())
    for key, value in change.items():
        stage, _, rest = key.partition(".")
        node = data["stages"][int(stage[7:-1])]
        keys = rest.split(".")
        for k in keys[:-1]:
            node = node[k]
        if value is None:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
