"""Orbax directories (params + model.yaml + tokenizer) and the `python -m jaxllama.convert` CLI."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import yaml
from parity.tiny_llama import save_model, tiny_model, tiny_tokenizer

from jaxllama import AttentionConfig, ModelConfig
from jaxllama.checkpoint import CheckpointError, checkpoint_format, load_checkpoint, save_orbax
from jaxllama.config import LambdaConfig, load_model_config
from jaxllama.convert import main
from jaxllama.model import init_params

# Written by the code before orbax stored the model's own tree (commit 1a3e4c2): `save_orbax` of
# `filled(hybrid_config(), 0)`, generation config {"eos_token_ids": [1]}, no tokenizer.
LEGACY = Path(__file__).parent.parent / "fixtures" / "orbax-hybrid-tiny"


def hybrid_config() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                       layer_pattern=("dense", "lambda", "lambda"),
                       max_position_embeddings=64,
                       attention=AttentionConfig(num_heads=2, num_kv_heads=1),
                       lambda_=LambdaConfig(global_tokens=2, window=4), tie_word_embeddings=False)


def filled(cfg: ModelConfig, seed: int) -> dict:
    """`Transformer(cfg)`'s params tree with standard normal float32 leaves, filled in leaf order
    (cheaper than running `init_params`: only its shapes are traced)."""
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A bfloat16 HF directory with a tokenizer (yarn rope, tied): what convert starts from."""
    path = tmp_path_factory.mktemp("tiny") / "hf"
    save_model(tiny_model(seed=31, tie=True, rope={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
        path, dtype=torch.bfloat16)
    tiny_tokenizer().save_pretrained(path)
    return path


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_orbax_round_trip(tiny_dir, tmp_path):
    ck = load_checkpoint(tiny_dir)
    assert ck.tokenizer is not None
    out = tmp_path / "orbax"
    save_orbax(ck.config, ck.params, ck.tokenizer, out, ck.generation_config)
    assert checkpoint_format(out) == "orbax"
    assert load_model_config(out / "model.yaml") == ck.config  # a plain model preset
    back = load_checkpoint(out)
    assert back.config == ck.config and back.generation_config == ck.generation_config
    assert_same_params(back.params, ck.params)
    text = "w5 w6 w77 unknown"
    assert back.tokenizer.encode(text) == ck.tokenizer.encode(text)
    assert back.tokenizer.chat_template == ck.tokenizer.chat_template
    as_bf16 = load_checkpoint(out, dtype="bfloat16")
    assert as_bf16.config.param_dtype == "bfloat16"
    assert_same_params(as_bf16.params, jax.tree.map(lambda a: a.astype("bfloat16"), ck.params))


def test_orbax_overrides_split_runs(tiny_dir, tmp_path):
    ck = load_checkpoint(tiny_dir)
    out = save_orbax(ck.config, ck.params, None, tmp_path / "orbax")
    mixed = load_checkpoint(out, overrides=["model.layer_pattern=lambda*1,dense*1",
                                            "model.lambda.window=4"])
    assert mixed.config.runs == (("lambda", 1), ("dense", 1))
    up = ("block", "mlp", "up", "kernel")

    def leaf(tree, run):
        for k in (run,) + up:
            tree = tree[k]
        return np.asarray(tree)

    np.testing.assert_array_equal(leaf(mixed.params, "run_1")[0], leaf(ck.params, "run_0")[1])
    with pytest.raises(CheckpointError, match="would change shape"):
        load_checkpoint(out, overrides=["model.intermediate_size=16"])


def test_orbax_round_trip_dense_lambda_hybrid(tmp_path):
    """The model's own tree (two runs: dense, lambda) saves and restores exactly, in its dtype and
    cast on load; a tree that is not the config's is refused before anything is written."""
    cfg = hybrid_config()
    params = filled(cfg, 7)
    out = save_orbax(cfg, params, None, tmp_path / "o", {"eos_token_ids": [3]})
    back = load_checkpoint(out)
    assert back.config == cfg and back.generation_config == {"eos_token_ids": [3]}
    assert back.tokenizer is None
    assert_same_params(back.params, params)
    assert_same_params(load_checkpoint(out, dtype="bfloat16").params,
                       jax.tree.map(lambda a: a.astype("bfloat16"), params))
    bad = {**params, "norm": {"scale": np.ones(8, np.float32)}}
    with pytest.raises(CheckpointError, match=r"norm/scale has shape \[8\], the model config "
                                              r"needs \[16\]"):
        save_orbax(cfg, bad, None, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_orbax_written_before_own_tree_still_loads():
    ck = load_checkpoint(LEGACY)
    cfg = hybrid_config()  # the old writer stored the derived head_dim (8) explicitly
    cfg = cfg.replace(attention=dataclasses.replace(cfg.attention, head_dim=8))
    assert ck.config == cfg and ck.generation_config == {"eos_token_ids": [1]}
    assert_same_params(ck.params, filled(ck.config, 0))


def test_orbax_stored_tree_must_match_the_config(tmp_path):
    """A model.yaml that does not describe the stored params: one line naming the first differing
    path and both shapes, or the path the stored tree lacks."""
    ck = tmp_path / "ck"
    shutil.copytree(LEGACY, ck)

    def edit(**model):
        data = yaml.safe_load((LEGACY / "model.yaml").read_text())
        data["model"].update(model)
        (ck / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    edit(intermediate_size=24)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ck)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(ck / "params")), msg
    assert "run_0/block/mlp/down/kernel has shape [1, 32, 16]" in msg
    assert "model.yaml needs [1, 24, 16]" in msg
    edit(tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="lm_head/kernel .shape .16, 64.. is not a parameter"):
        load_checkpoint(ck)


def test_convert_hf_orbax_hf(tiny_dir, tmp_path, capsys):
    """HF (bf16) -> orbax -> HF keeps every weight and the dtype (--dtype auto)."""
    assert main(["--input", str(tiny_dir), "--output", str(tmp_path / "o"), "--to", "orbax"]) == 0
    assert main(["--input", str(tmp_path / "o"), "--output", str(tmp_path / "h"),
                 "--to", "hf"]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    src, back = load_checkpoint(tiny_dir, "bfloat16"), load_checkpoint(tmp_path / "h", "bfloat16")
    assert back.config == src.config
    assert_same_params(back.params, src.params)
    assert '"torch_dtype": "bfloat16"' in (tmp_path / "h" / "config.json").read_text()
    assert back.tokenizer.encode("w9 w10") == [9, 10]
    assert main(["--input", str(tmp_path / "o"), "--output", str(tmp_path / "f"), "--to", "hf",
                 "--dtype", "float32"]) == 0
    assert load_checkpoint(tmp_path / "f").params["embed"]["embedding"].dtype == np.float32


def cli_error(argv, capsys, *parts) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for p in parts:
        assert p in err, err
    return err


def test_convert_errors(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    cli_error(["--input", str(tmp_path / "missing"), "--output", out, "--to", "hf"], capsys,
              "missing", "no such file")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + bytes(range(40)))
    cli_error(["--input", str(fake), "--output", out, "--to", "hf"], capsys,
              "fake.gguf", "not a readable GGUF file")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    cli_error(["--input", str(tiny_dir), "--output", str(busy), "--to", "orbax"], capsys,
              "not an empty directory", "--overwrite")
    assert [f.name for f in busy.iterdir()] == ["x"]
    cli_error(["--input", str(tiny_dir), "--output", out, "--to", "hf",
               "--override", "model.attention.num_heads=3"], capsys, "num_heads")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["busy", "fake.gguf"]  # nothing left
    with pytest.raises(SystemExit) as bad_flag:
        main(["--input", str(tiny_dir), "--output", out, "--to", "onnx"])
    assert bad_flag.value.code == 2
    assert main(["--input", str(tiny_dir), "--output", str(busy), "--to", "orbax",
                 "--overwrite"]) == 0
    assert checkpoint_format(busy) == "orbax" and not (busy / "x").exists()


def test_convert_cli_process_error_has_no_traceback(tmp_path):
    argv = [sys.executable, "-m", "jaxllama.convert", "--input", str(tmp_path / "nothing"),
            "--output", str(tmp_path / "o"), "--to", "hf"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "o").exists()
