"""HF directories: one-line errors naming tensor and file, export round trips through transformers,
atomic writes."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from parity.tiny_llama import hf_logits, our_logits, random_ids, save_model, tiny_model
from safetensors.numpy import load_file, save_file

from jaxllama.checkpoint import CheckpointError, load_checkpoint, save_hf
from jaxllama.checkpoint.base import relayout, tensor_specs, with_overrides
from jaxllama.mixers import REGISTRY
from jaxllama.model import init_params, unstack


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A float32 single-file HF directory (untied, GQA 2)."""
    path = tmp_path_factory.mktemp("tiny") / "hf"
    save_model(tiny_model(seed=11), path)
    return path


def one_line_error(path, match, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    for part in match:
        assert part in msg, msg
    return msg


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def test_params_match_the_model_tree(tiny_dir):
    """The streamed tree has exactly the structure, shapes and dtypes `init_params` builds."""
    ckpt = load_checkpoint(tiny_dir)
    want = jax.eval_shape(lambda: init_params(ckpt.config, jax.random.key(0)))
    assert jax.tree.structure(ckpt.params) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(ckpt.params), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_missing_tensor(tiny_dir, tmp_path):
    path = copy_dir(tiny_dir, tmp_path / "m")
    file = rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    one_line_error(path, ["model.layers.1.mlp.up_proj.weight", "missing", str(file)])


def test_unexpected_tensor(tiny_dir, tmp_path):
    path = copy_dir(tiny_dir, tmp_path / "u")
    extra = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    file = rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": extra}))
    one_line_error(path, ["model.layers.0.mlp.extra.weight", "unexpected", str(file)])


def test_misshaped_tensor(tiny_dir, tmp_path):
    path = copy_dir(tiny_dir, tmp_path / "s")
    name = "model.layers.0.self_attn.k_proj.weight"
    file = rewrite_weights(path, lambda t: t.update({name: t[name][:-2]}))
    one_line_error(path, [name, "shape [30, 48]", "expected [32, 48]", str(file)])


def test_sharded_errors(tmp_path):
    path = save_model(tiny_model(seed=12), tmp_path / "sh", max_shard_size="40KB")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = index["weight_map"].pop(name)
    index_file.write_text(json.dumps(index))
    one_line_error(path, [name, "missing", str(index_file)])
    index["weight_map"][name] = shard
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = shard
    index_file.write_text(json.dumps(index))
    one_line_error(path, ["model.layers.7.mlp.up_proj.weight", "unexpected", shard])
    del index["weight_map"]["model.layers.7.mlp.up_proj.weight"]
    index["weight_map"][name] = "model-00099-of-00099.safetensors"
    index_file.write_text(json.dumps(index))
    one_line_error(path, ["model-00099-of-00099.safetensors", "does not exist"])


def test_bad_directories(tiny_dir, tmp_path):
    one_line_error(tmp_path / "nope", ["nope", "no such file"])
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(empty, ["neither an HF directory"])
    path = copy_dir(tiny_dir, tmp_path / "cfg")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    one_line_error(path, ["config.json", "model_type 'gpt2' is not supported"])
    (path / "config.json").write_text("{ not json")
    one_line_error(path, ["config.json", "not valid JSON"])
    (path / "config.json").write_text(json.dumps(raw))
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    one_line_error(path, ["model.safetensors", "not a readable safetensors file"])
    text = tmp_path / "weights.bin"
    text.write_text("hello")
    one_line_error(text, ["weights.bin", "not a GGUF file"])
    with pytest.raises(CheckpointError, match="dtype 'float64'"):
        load_checkpoint(tiny_dir, dtype="float64")


EXPORT_CASES = {
    "untied-bias-longrope-f32": ({"heads": 6, "kv": 2, "bias": True, "rope": {
        "rope_type": "longrope", "original_max_position_embeddings": 16,
        "short_factor": [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4],
        "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}}, "float32", None),
    "llama3-tied": ({"heads": 8, "kv": 2, "tie": True, "rope": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}, "float32", None),
    "yarn-bf16-sharded": ({"rope": {"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 16}},
                          "bfloat16", 30_000),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_round_trip_through_transformers(case, tmp_path):
    model_kw, dtype, shard_bytes = EXPORT_CASES[case]
    src = save_model(tiny_model(seed=21, **model_kw), tmp_path / "src")
    ckpt = load_checkpoint(src, dtype=dtype)
    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    out = save_hf(ckpt.config, ckpt.params, ckpt.tokenizer, tmp_path / "out",
                  ckpt.generation_config, **kw)
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rope_parameters" not in raw and "rope_theta" in raw  # the 4.x form
    assert raw["torch_dtype"] == dtype
    if shard_bytes:
        assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    ids = random_ids(5, 2, 24, ckpt.config.vocab_size)
    ref = hf_logits(out, ids)  # transformers reads our export, upcasting to float32
    ours = our_logits(ckpt.config.replace(dtype="float32"), ckpt.params, ids)  # f32 compute
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)
    if dtype == "float32":  # nothing was rounded: transformers' own original gives the same
        np.testing.assert_array_less(np.abs(hf_logits(src, ids) - ref).max(), 1e-5)
    back = load_checkpoint(out, dtype=dtype)
    assert back.config == ckpt.config
    assert back.generation_config == ckpt.generation_config
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(ckpt.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_export_refuses_non_empty_dir_and_leaves_nothing_on_failure(tiny_dir, tmp_path):
    ckpt = load_checkpoint(tiny_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_hf(ckpt.config, ckpt.params, None, out)
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    bad = jax.tree.map(lambda a: a, ckpt.params)
    bad["run_0"]["block"]["mlp"]["up"]["kernel"] = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(CheckpointError, match="mlp/up/kernel: shape"):
        save_hf(ckpt.config, bad, None, tmp_path / "fresh")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]  # no temp dir, no "fresh"
    save_hf(ckpt.config, ckpt.params, None, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_overrides_split_runs_when_streaming(tiny_dir):
    """A layer-pattern override regroups layers into runs while loading (HF layer l -> run, j)."""
    plain = load_checkpoint(tiny_dir)
    mixed = load_checkpoint(tiny_dir, overrides=["model.layer_pattern=dense*1,lambda*1",
                                                 "model.lambda.window=8",
                                                 "lambda.global_tokens=2"])
    assert mixed.config.runs == (("dense", 1), ("lambda", 1))
    assert mixed.config.lambda_.window == 8 and mixed.config.lambda_.global_tokens == 2
    want = jax.eval_shape(lambda: init_params(mixed.config, jax.random.key(0)))
    assert jax.tree.structure(mixed.params) == jax.tree.structure(want)
    q = ("block", "mixer", "q_proj", "kernel")

    def leaf(tree, run):
        node = tree[run]
        for k in q:
            node = node[k]
        return np.asarray(node)

    np.testing.assert_array_equal(leaf(mixed.params, "run_1")[0], leaf(plain.params, "run_0")[1])
    assert len(tensor_specs(mixed.config)) == len(tensor_specs(plain.config))


def test_bf16_source_upcast_to_float32_is_exact(tmp_path):
    model = tiny_model(seed=5)
    path = save_model(model, tmp_path / "bf", dtype=torch.bfloat16)
    ckpt = load_checkpoint(path, dtype="float32")
    want = model.model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16).float().numpy()
    got = np.asarray(ckpt.params["run_0"]["block"]["mlp"]["down"]["kernel"][1])
    np.testing.assert_array_equal(got, want.T)


def test_relayout_moves_layers_through_the_per_layer_view(tiny_dir):
    """relayout(plain -> dense*1,lambda*1) puts layer l's tree at layer l of the new runs, and
    back again gives the original tree leaf for leaf."""
    plain = load_checkpoint(tiny_dir)
    mixed = with_overrides(plain.config, ["layer_pattern=dense*1,lambda*1", "lambda.window=8"])
    moved = relayout(plain.params, plain.config, mixed)
    assert sorted(moved) == sorted(k for k in plain.params if k != "run_0") + ["run_0", "run_1"]
    for a, b in zip(unstack(mixed, moved), unstack(plain.config, plain.params), strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    back = relayout(moved, mixed, plain.config)
    jax.tree.map(np.testing.assert_array_equal, back, plain.params)
    bigger = with_overrides(plain.config, ["intermediate_size=48"])
    with pytest.raises(CheckpointError, match=r"overrides: layer 0 mlp/down/kernel would change"):
        relayout(plain.params, plain.config, bigger)


def test_a_kind_without_hf_tensors_is_refused_naming_layer_and_kind(tiny_dir, tmp_path,
                                                                    monkeypatch):
    """A registered kind whose spec has no HF table: export and import each fail in one line
    naming the first such layer, and nothing is written."""
    plain = load_checkpoint(tiny_dir)
    monkeypatch.setitem(REGISTRY, "lambda", dataclasses.replace(REGISTRY["lambda"],
                                                                hf_tensors=None))
    mixed = with_overrides(plain.config, ["layer_pattern=dense*1,lambda*1", "lambda.window=8"])
    with pytest.raises(CheckpointError, match=r"^layer 1: layer kind 'lambda' has no HF checkpoint "
                                              r"layout$"):
        save_hf(mixed, relayout(plain.params, plain.config, mixed), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    one_line_error(tiny_dir, ["layer 1: layer kind 'lambda' has no HF checkpoint layout"],
                   overrides=["model.layer_pattern=dense*1,lambda*1", "model.lambda.window=8"])
