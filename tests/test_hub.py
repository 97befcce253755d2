"""Hub model ids (`org/name[@revision]`) as checkpoints, against a fake Hugging Face cache.

The cache is laid out exactly as huggingface_hub lays it out (`models--org--name/blobs/<hash>`,
`refs/<ref>` holding a commit sha, `snapshots/<sha>/<file>` symlinks into blobs) and every test runs
with HF_HUB_OFFLINE=1 and sockets disabled, so nothing can reach the network: an id resolves to its
snapshot (a ref or a commit sha picks the right one), loads through `from_pretrained` and the
generate CLI, and a missing id, a pickle-only repo or an incomplete sharded snapshot is one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxllama
from jaxllama.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_hf
from jaxllama.checkpoint.hub import parse_hub_id
from jaxllama.generate import main as generate_main

REPO = "tiny-org/tiny-llama"
SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40


def add_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str,
                 refs: tuple[str, ...] = ("main",)) -> Path:
    """Store `files` as commit `commit` of model repo `repo_id` in `cache`, as huggingface_hub does:
    content-addressed blobs, symlinks from the snapshot, each ref a file holding the sha."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, like huggingface_hub
    return snapshot


def dir_files(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF cache, offline, with sockets disabled (in this process and its children)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read the environment when transformers imported it: set its constants too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


@pytest.fixture(scope="module")
def two_models(make_tiny_hf):
    """Two tiny HF Llama directories with different random weights."""
    return (make_tiny_hf("hub_a", tie=True, kv_heads=2, context=64, seed=1),
            make_tiny_hf("hub_b", tie=True, kv_heads=2, context=64, seed=2))


def assert_same_params(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("spec, want", [
    ("org/name", ("org/name", None)),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", ("HuggingFaceTB/SmolLM2-135M-Instruct", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("org/name@" + SHA_MAIN, ("org/name", SHA_MAIN)),
    ("runs/x/final", None), ("./org/name", None), ("/abs/org", None), ("model.gguf", None),
    ("org--x/name", None), ("org/../name", None), ("org/name@", None), ("org/", None),
])
def test_parse_hub_id(spec, want):
    assert parse_hub_id(spec) == want


def test_hub_id_resolves_to_the_right_snapshot_and_loads(hub_cache, two_models):
    a, b = two_models
    snap_a = add_snapshot(hub_cache, REPO, dir_files(a), SHA_MAIN, ("main",))
    snap_b = add_snapshot(hub_cache, REPO, dir_files(b), SHA_V1, ("v1",))
    assert resolve_checkpoint(REPO) == str(snap_a)
    assert resolve_checkpoint(f"{REPO}@v1") == str(snap_b)  # a ref (tag)
    assert resolve_checkpoint(f"{REPO}@{SHA_V1}") == str(snap_b)  # a commit sha
    assert resolve_checkpoint(f"{REPO}@{SHA_MAIN}") == str(snap_a)
    llm = jaxllama.from_pretrained(REPO)
    assert llm.source == str(snap_a) and llm.tokenizer is not None
    assert_same_params(llm.params, load_checkpoint(a).params)
    llm_b = jaxllama.from_pretrained(f"{REPO}@v1")
    assert_same_params(llm_b.params, load_checkpoint(b).params)
    with pytest.raises(AssertionError):  # the two revisions really differ
        assert_same_params(llm.params, llm_b.params)


def test_local_path_wins_over_hub_id(hub_cache, two_models, tmp_path, monkeypatch):
    a, b = two_models
    add_snapshot(hub_cache, REPO, dir_files(a), SHA_MAIN)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(b, tmp_path / REPO)  # ./tiny-org/tiny-llama exists: it is the checkpoint
    assert resolve_checkpoint(REPO) == REPO
    assert_same_params(load_checkpoint(REPO).params, load_checkpoint(b).params)


def test_generate_cli_with_hub_id(hub_cache, two_models):
    """`python -m jaxllama.generate --checkpoint org/name` in a fresh process (environment only)
    answers exactly what the same model loaded from its directory answers."""
    a, _ = two_models
    add_snapshot(hub_cache, REPO, dir_files(a), SHA_MAIN)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLLAMA_COMPILE_CACHE": "",
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    r = subprocess.run([sys.executable, "-m", "jaxllama.generate", "--checkpoint", REPO,
                        "--prompt", "hello", "--no-chat", "--json", "--max-new-tokens", "4"],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = jaxllama.from_pretrained(a).generate("hello", max_new_tokens=4, chat=False)
    assert got["token_ids"] == want.token_ids and len(got["token_ids"]) >= 1


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_id_is_one_line_error(hub_cache, capsys):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint("no-org/no-model")
    msg = str(e.value)
    assert "\n" not in msg
    for word in ("no-org/no-model", str(hub_cache / "models--no-org--no-model"), "HF_HUB_OFFLINE",
                 "local directory"):
        assert word in msg, msg
    assert generate_main(["--prompt", "hi", "--checkpoint", "no-org/no-model@v2"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "no-org/no-model@v2" in line and "Hugging Face cache" in line


def test_unknown_revision_of_cached_repo(hub_cache, two_models):
    add_snapshot(hub_cache, REPO, dir_files(two_models[0]), SHA_MAIN)
    with pytest.raises(CheckpointError, match=f"{REPO}@nope: no such local path, and not in"):
        resolve_checkpoint(f"{REPO}@nope")


def test_pickle_only_repo_needs_safetensors(hub_cache, two_models):
    files = {k: v for k, v in dir_files(two_models[0]).items() if not k.endswith(".safetensors")}
    files["pytorch_model.bin"] = b"PK\x03\x04 not read"
    add_snapshot(hub_cache, "org/bin-only", files, SHA_MAIN)
    with pytest.raises(CheckpointError) as e:
        jaxllama.from_pretrained("org/bin-only")
    msg = str(e.value)
    assert "\n" not in msg and "org/bin-only" in msg, msg
    assert "pytorch_model.bin" in msg and "safetensors only" in msg, msg


def test_sharded_snapshot(hub_cache, two_models, tmp_path):
    """An index and its shards resolve and load; a snapshot missing a shard is one line."""
    ck = load_checkpoint(two_models[0])
    sharded = Path(save_hf(ck.config, ck.params, ck.tokenizer, tmp_path / "sharded",
                           ck.generation_config, max_shard_bytes=2 * 1024**2))
    files = dir_files(sharded)
    shards = sorted(k for k in files if k.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    add_snapshot(hub_cache, "org/sharded", files, SHA_MAIN)
    assert_same_params(load_checkpoint("org/sharded").params, ck.params)
    del files[shards[-1]]
    add_snapshot(hub_cache, "org/partial", files, SHA_MAIN)
    with pytest.raises(CheckpointError, match=r"org/partial: 1 of \d+ shards .*HF_HUB_OFFLINE"):
        load_checkpoint("org/partial")


def test_train_init_and_convert_take_hub_ids(hub_cache, two_models, tmp_path):
    """training's `init.checkpoint` and `convert --input` resolve through the same function."""
    from jaxllama.convert import main as convert_main
    from jaxllama.training.config import train_config_from_dict
    from jaxllama.training.trainer import load_model

    a, _ = two_models
    add_snapshot(hub_cache, REPO, dir_files(a), SHA_MAIN)
    cfg = train_config_from_dict({"init": {"checkpoint": f"{REPO}@main"}})
    bundle = load_model(cfg)
    assert_same_params(bundle.params, load_checkpoint(a).params)
    assert convert_main(["--input", REPO, "--output", str(tmp_path / "out"), "--to", "hf"]) == 0
    assert_same_params(load_checkpoint(tmp_path / "out").params, load_checkpoint(a).params)
