"""`python -m jaxllama.generate`: bad input gives one line on stderr and a non-zero exit (no
traceback); --json prints one object per prompt; the embedded SmolLM2 answers "Paris"."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxllama.generate import main

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLLAMA_COMPILE_CACHE": ""}


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "jaxllama.generate", *args], env=ENV, check=False,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(err: str, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_hf(make_tiny_hf):
    """A tiny random Llama (SmolLM2's tokenizer, 64-token context) saved as an HF directory."""
    return make_tiny_hf("tiny", tie=True, kv_heads=2, context=64, seed=0)


def test_bad_flag_value_subprocess():
    r = run_cli("--prompt", "hi", "--temperature", "-1", timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    one_line_error(r.stderr, "--temperature", ">= 0")


@pytest.mark.parametrize("args, words", [
    (["--top-p", "2"], ["--top-p", "<= 1"]),
    (["--top-p", "0"], ["--top-p", "> 0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--top-k", "many"], ["--top-k", "many"]),
    (["--dtype", "int8"], ["--dtype", "int8"]),
])
def test_bad_flag_values(capsys, args, words):
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "hi", *args])
    assert e.value.code == 2
    one_line_error(capsys.readouterr().err, *words)


def test_missing_and_unreadable_checkpoint(capsys, tmp_path):
    assert main(["--prompt", "hi", "--checkpoint", str(tmp_path / "nope")]) == 1
    one_line_error(capsys.readouterr().err, "nope", "no such file")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert main(["--prompt", "hi", "--checkpoint", str(bad)]) == 1
    one_line_error(capsys.readouterr().err, "config.json")
    assert not list(tmp_path.glob("*.tmp*"))  # nothing half-written


def test_prompt_longer_than_context(capsys, tiny_hf):
    long = "word " * 80
    assert main(["--prompt", long, "--checkpoint", tiny_hf, "--no-chat"]) == 1
    one_line_error(capsys.readouterr().err, "tokens but the context holds 64")
    assert main(["--prompt", "word " * 8, "--checkpoint", tiny_hf, "--no-chat",
                 "--max-len", "4"]) == 1
    one_line_error(capsys.readouterr().err, "context holds 4")


def test_prompt_file(capsys, tiny_hf, tmp_path):
    """--prompt-file reads the prompt (same answer as --prompt with its text, order kept with
    --prompt); missing, undecodable or empty files and no prompt at all are one-line errors."""
    text = "a long document " * 5
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    common = ["--checkpoint", tiny_hf, "--no-chat", "--json", "--max-new-tokens", "4"]
    assert main(["--prompt", text, *common]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(["--prompt", "hi", "--prompt-file", str(tmp_path / "p.txt"), *common]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["hi", text]
    assert rows[1]["token_ids"] == want["token_ids"]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "empty.txt").write_text("")
    for path, words in [(tmp_path / "nope.txt", ["--prompt-file", "nope.txt", "No such file"]),
                        (tmp_path / "bad.txt", ["--prompt-file", "bad.txt", "UnicodeDecodeError"])]:
        with pytest.raises(SystemExit) as e:
            main(["--prompt-file", str(path), *common])
        assert e.value.code == 2
        one_line_error(capsys.readouterr().err, *words)
    with pytest.raises(SystemExit) as e:
        main(common)
    assert e.value.code == 2
    one_line_error(capsys.readouterr().err, "--prompt or --prompt-file is required")
    assert main(["--prompt-file", str(tmp_path / "empty.txt"), *common]) == 1
    one_line_error(capsys.readouterr().err, "prompt is empty")


def test_bad_overrides(capsys, tiny_hf):
    assert main(["--prompt", "hi", "--checkpoint", tiny_hf, "--override", "nonexistent=3"]) == 1
    one_line_error(capsys.readouterr().err, "nonexistent", "unknown key")
    assert main(["--prompt", "hi", "--checkpoint", tiny_hf, "--override", "lambda.window"]) == 1
    one_line_error(capsys.readouterr().err, "KEY=VALUE")
    assert main(["--prompt", "hi", "--checkpoint", tiny_hf, "--layer-pattern", "mamba"]) == 1
    one_line_error(capsys.readouterr().err, "mamba")


def test_json_batch(capsys, tiny_hf):
    code = main(["--prompt", "hello there", "--prompt", "a much longer second prompt here",
                 "--checkpoint", tiny_hf, "--json", "--max-new-tokens", "5", "--seed", "3",
                 "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    rows = [json.loads(x) for x in lines]
    for row, prompt in zip(rows, ["hello there", "a much longer second prompt here"]):
        assert row["prompt"] == prompt
        assert 1 <= len(row["token_ids"]) <= 5 and isinstance(row["text"], str)
        assert row["prompt_tokens"] > 2
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] >= 0
    assert rows[0]["prompt_tokens"] != rows[1]["prompt_tokens"]
    assert np.all([0 <= t < 49152 for r in rows for t in r["token_ids"]])


def test_paris_from_embedded_model():
    r = run_cli("--prompt", "What is the capital of France?", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "Traceback" not in r.stderr
