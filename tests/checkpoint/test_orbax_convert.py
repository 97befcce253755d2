"""Orbax directories (params + model.yaml + tokenizer) and the `python -m jaxllama.convert` CLI."""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from parity.tiny_llama import save_model, tiny_model, tiny_tokenizer

from jaxllama.checkpoint import CheckpointError, checkpoint_format, load_checkpoint, save_orbax
from jaxllama.config import load_model_config
from jaxllama.convert import main


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
