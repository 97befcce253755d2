"""The first hour of a new user (issue 18): relative orbax paths, lambda defaults, a finished
train run rerun, flag errors and hints of every CLI, the statistics and status lines, the GGUF
weights cache, the compile cache of the library, rms_norm_eps exported as the GGUF meant it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

import jaxllama
from jaxllama.config import ConfigError, LambdaConfig, ModelConfig, model_config_from_dict

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = str(ROOT / "configs/train/tiny.yaml")


@pytest.fixture(scope="module")
def tiny_hf(make_tiny_hf):
    return make_tiny_hf("first-hour", tie=True, kv_heads=2, context=128, seed=5)


def one_line(err: str, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


# ----------------------------------------------------------------------------- 1. relative paths


def test_orbax_checkpoint_by_relative_path(tiny_hf, tmp_path, monkeypatch, capsys):
    from jaxllama import convert, generate

    monkeypatch.chdir(tmp_path)
    assert convert.main(["--input", tiny_hf, "--output", "out_orbax", "--to", "orbax"]) == 0
    llm = jaxllama.from_pretrained("out_orbax", verbose=False)
    ref = jaxllama.from_pretrained(tiny_hf, verbose=False)
    ids = np.arange(1, 9, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(llm(ids)), np.asarray(ref(ids)))
    capsys.readouterr()
    assert generate.main(["--checkpoint", "out_orbax", "--prompt", "hi", "--json",
                          "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "hi"
    assert convert.main(["--input", "out_orbax", "--output", "back_hf", "--to", "hf"]) == 0
    assert (tmp_path / "back_hf" / "config.json").is_file()


# ----------------------------------------------------------------------------- 2. lambda defaults


def test_lambda_pattern_gets_lm_infinite_defaults(tiny_hf):
    cfg = model_config_from_dict({"layer_pattern": ["dense", "lambda"],
                                  "max_position_embeddings": 4096})
    # LM-Infinite's Llama-2 recipe for a 4K-trained model: local 4096, global 100, limit 4096
    assert cfg.lambda_ == LambdaConfig(global_tokens=100, window=4096, distance=4096)
    assert LambdaConfig.for_context(16) == LambdaConfig(16, 16, 16)
    # an explicit lambda section is kept
    given = model_config_from_dict({"layer_pattern": "lambda", "lambda": {"window": 8}})
    assert given.lambda_.window == 8
    with pytest.raises(ConfigError, match=r"model\.lambda\.window="):
        LambdaConfig.for_context(0)
    # built directly, without a mapping, the missing section is an error naming the override
    with pytest.raises(ConfigError, match=r"no `lambda` config \(add one, e\.g\. model\.lambda\."):
        ModelConfig(layer_pattern=("lambda",))
    llm = jaxllama.from_pretrained(tiny_hf, overrides=["model.layer_pattern=lambda"],
                                   verbose=False)
    assert llm.config.lambda_ == LambdaConfig(100, 128, 128)
    assert len(llm.generate("hi", max_new_tokens=2).token_ids) >= 1


# ----------------------------------------------------------------------------- 3. finished run


def test_rerun_of_a_finished_train_run(tmp_path, monkeypatch, capsys, caplog):
    from jaxllama import train

    monkeypatch.chdir(ROOT)
    caplog.set_level("INFO", "jaxllama")
    argv = ["--config", TINY_TRAIN, "train.steps=2", f"checkpoint.dir={tmp_path}/ckpt",
            f"log.dir={tmp_path}", "log.tensorboard=false", "mesh.data=8", "mesh.seq=1",
            "model.kernels.context_parallel=none", "train.batch_size=8"]
    assert train.main(argv) == 0
    assert capsys.readouterr().out.startswith("done: step 2 loss ")
    # what it was doing, on stderr: loading, setting up, compiling
    for line in ("loading the model", "setting up the train state", "compiling the train step"):
        assert line in caplog.text
    caplog.clear()
    assert train.main(argv) == 0
    assert "compiling" not in caplog.text  # a finished run compiles nothing
    out = capsys.readouterr().out
    one_line(out, "run already complete at step 2", "train.steps=", "checkpoint.dir=")
    assert "Traceback" not in out


# ----------------------------------------------------------------------------- flags, one style


@pytest.mark.parametrize("module, argv, words", [
    ("train", ["--config", TINY_TRAIN, "--steps", "5"], ["unrecognized", "train.steps=5"]),
    ("train", ["--config", TINY_TRAIN, "--lr=0.1"], ["train.lr=0.1"]),
    ("train", ["--bogus"], ["--config"]),
    ("convert", ["--output", "x", "--to", "onnx"], ["--to", "onnx"]),
    ("convert", ["--to", "hf"], ["--output"]),
    ("kvcache", ["--config", "x", "--seq-len", "0"], ["--seq-len", "> 0"]),
    ("generate", ["--prompt", "a", "--memory-tokens", "x"], ["--memory-tokens", "E:M"]),
])
def test_bad_flags_are_one_line(module, argv, words, capsys):
    import importlib

    main = importlib.import_module(f"jaxllama.{module}").main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    one_line(err, f"python -m jaxllama.{module}: error:", *words)


def test_model_overrides_prefix():
    from jaxllama.cli import model_overrides

    assert model_overrides(["lambda.window=4", "model.dtype=float32"], "lambda") == [
        "model.layer_pattern=lambda", "model.lambda.window=4", "model.dtype=float32"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        model_overrides(["lambda.window"])


# ----------------------------------------------------------------------------- stats and status


def _stats_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "prompt(s)," in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.usefixtures("without_compile_cache")  # the status line waits 0.3 s of compiling
def test_stats_line_counts_every_prompt_and_status_lines(tiny_hf, capsys):
    from jaxllama.generate import main

    prompts = ["hello there", "a much longer second prompt, padded against the first"]
    argv = ["--checkpoint", tiny_hf, "--json", "--max-new-tokens", "3", "--no-chat"]
    assert main([a for p in prompts for a in ("--prompt", p)] + argv) == 0
    cap = capsys.readouterr()
    rows = [json.loads(x) for x in cap.out.splitlines()]
    total = sum(r["prompt_tokens"] for r in rows)
    assert rows[0]["prompt_tokens"] != total
    assert f"2 prompt(s), {total} prompt tokens" in _stats_line(cap.err)
    assert "[jaxllama] compiling" not in cap.err  # --json is quiet ...
    assert main(["--prompt", "hi", *argv, "--verbose"]) == 0
    err = capsys.readouterr().err  # ... unless --verbose
    assert "[jaxllama] compiling for 1 prompt(s)" in err
    # plain output says it on a terminal; captured here (not a terminal), only the stats line
    assert main(["--prompt", "hi", "--checkpoint", tiny_hf, "--max-new-tokens", "2",
                 "--no-chat"]) == 0
    err = capsys.readouterr().err
    assert "compiling" not in err and "prompt(s)," in err


def test_memory_tokens_prints_the_stats_line(tiny_hf, capsys):
    from jaxllama.generate import main

    assert main(["--prompt", "one two three four five", "--checkpoint", tiny_hf, "--no-chat",
                 "--memory-tokens", "4:1", "--max-new-tokens", "3", "--json"]) == 0
    cap = capsys.readouterr()
    row = json.loads(cap.out)
    line = _stats_line(cap.err)
    assert line.startswith("[jaxllama] 1 prompt(s), ") and "memory_token_id" in row
    assert f", {len(row['token_ids'])} generated:" in line


# ----------------------------------------------------------------------------- GGUF weights cache


def _write_tiny_gguf(path: Path) -> None:
    """A 1-layer Llama GGUF with random weights (one tensor Q8_0), no vocabulary."""
    rng = np.random.default_rng(0)
    d, f, heads, kv, hd, vocab = 32, 64, 4, 2, 8, 64
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": d,
                       "feed_forward_length": f, "head_count": heads, "head_count_kv": kv,
                       "rope_freq_base": 10000.0, "layer_norm_rms_eps": 1e-5,
                       "key_length": hd}.items():
        getattr(w, f"add_{key}")(value)
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,),
              "output.weight": (vocab, d), "blk.0.attn_norm.weight": (d,),
              "blk.0.ffn_norm.weight": (d,), "blk.0.attn_q.weight": (heads * hd, d),
              "blk.0.attn_k.weight": (kv * hd, d), "blk.0.attn_v.weight": (kv * hd, d),
              "blk.0.attn_output.weight": (d, heads * hd), "blk.0.ffn_gate.weight": (f, d),
              "blk.0.ffn_up.weight": (f, d), "blk.0.ffn_down.weight": (d, f)}
    for name, shape in shapes.items():
        a = rng.standard_normal(shape).astype(np.float32)
        if name == "blk.0.ffn_up.weight":
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_weights_cache(tmp_path, monkeypatch, caplog, dtype):
    from jaxllama.checkpoint.gguf import load_gguf, weights_cache_file

    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    caplog.set_level("INFO", "jaxllama")
    cold = load_gguf(path, dtype)
    file = weights_cache_file(path, dtype)
    assert file.is_file() and "dequantizing tiny.gguf" in caplog.text
    caplog.clear()
    warm = load_gguf(path, dtype, overrides=["model.layer_pattern=lambda"])
    assert "dequantized earlier" in caplog.text and "dequantizing" not in caplog.text
    assert warm.config.replace(layer_pattern=("dense",), lambda_=None) == cold.config
    assert warm.config.rms_norm_eps == 1e-5 and warm.generation_config == cold.generation_config
    for a, b in zip(jax.tree.leaves(cold.params), jax.tree.leaves(warm.params), strict=True):
        assert a.dtype == b.dtype == np.dtype(dtype if dtype == "float32" else a.dtype)
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # a damaged entry is rebuilt from the GGUF, with the same weights
    file.write_bytes(file.read_bytes()[:-100])
    caplog.clear()
    again = load_gguf(path, dtype)
    assert "dequantizing" in caplog.text
    for a, b in zip(jax.tree.leaves(cold.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # the opt-out writes nothing; a changed GGUF gets a new entry
    monkeypatch.setenv("JAXLLAMA_GGUF_CACHE", "0")
    file.unlink()
    load_gguf(path, dtype)
    assert not file.exists()
    monkeypatch.delenv("JAXLLAMA_GGUF_CACHE")
    os.utime(path, ns=(1, 1))
    assert weights_cache_file(path, dtype) != file


def test_exported_rms_norm_eps_is_the_ggufs_value(smollm2_jax):
    from jaxllama.checkpoint.hf_config import config_to_hf

    raw = config_to_hf(smollm2_jax.config, smollm2_jax.generation_config)
    assert '"rms_norm_eps": 1e-05' in json.dumps(raw)


# ----------------------------------------------------------------------------- compile cache


def test_library_uses_the_persistent_compile_cache(tiny_hf, tmp_path, monkeypatch):
    from jaxllama.api import compile_cache_dir

    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path))
    monkeypatch.delenv("JAXLLAMA_COMPILE_CACHE", raising=False)
    assert compile_cache_dir() == str(tmp_path / "xla")
    monkeypatch.setenv("JAXLLAMA_COMPILE_CACHE", "")
    assert compile_cache_dir() is None
    # a fresh process: from_pretrained turns the cache on (in the documented place)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION",
                                                                    "JAXLLAMA_COMPILE"))}
    env.update(JAXLLAMA_CACHE=str(tmp_path), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    code = (f"import jax, jaxllama; jaxllama.from_pretrained({tiny_hf!r}, verbose=False); "
            "print(jax.config.jax_compilation_cache_dir)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "xla")


def test_gguf_tokenizer_without_torch(smollm2_jax, smollm2_gguf_path):
    """`pip install -e .` brings no torch, and transformers' GGUF reader needs it: the tokenizer
    built from the metadata without torch is the one transformers builds."""
    from jaxllama.checkpoint.gguf import open_reader, tokenizer_from_metadata

    ref = smollm2_jax.tokenizer
    mine = tokenizer_from_metadata(open_reader(Path(smollm2_gguf_path)))
    for text in ["What is the capital of France?", "  hi\n\nthere  ", "ünïcödé 日本語 🙂",
                 "<|im_start|>user\nx<|im_end|>"]:
        assert mine(text)["input_ids"] == ref(text)["input_ids"], text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert mine.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (mine.bos_token_id, mine.eos_token_id, mine.pad_token_id, len(mine)) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref))
    assert sorted(mine.all_special_tokens) == sorted(ref.all_special_tokens)


def test_configs_cite_sources_in_the_repository_or_public():
    """Preset and recipe comments cite the paper or model card, not a document outside the
    repository ("METHODS section N")."""
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        assert "METHODS" not in path.read_text(), path


def test_library_status_lines(smollm2_jax, capsys):
    """from_pretrained says what it does on stderr (here: the embedded GGUF from the weights
    cache the session's first load wrote) with verbose=True, and by default on a terminal."""
    llm = jaxllama.from_pretrained(None, verbose=True)
    assert "[jaxllama] loading float32 weights dequantized earlier" in capsys.readouterr().err
    assert llm.config == smollm2_jax.config
    jaxllama.from_pretrained(None)  # stderr is not a terminal here: quiet by default
    assert "[jaxllama]" not in capsys.readouterr().err
