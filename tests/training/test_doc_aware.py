"""`data.packing: doc_aware` (FoT cross-batch training, METHODS section 7): the packer's rows,
positions, weights and segment ids against a from-the-definition reference; the loader's group id
ranges, process split and grad_accum interleave; the cross-batch memory layer reading a loader
batch sees exactly the rows of its own document; one-line config errors; and a tiny training run
with FoT layers, doc_aware packing and cross_batch_range 2 that lowers the loss.

Rows on the data axis: batches are placed in row order (row b on shard b // (B / shards)); a
group of k rows may straddle a shard edge, since the memory layer shifts keys and values along
the global batch axis (the sharded test of tests/training/test_cross_batch.py); the tiny run
below trains on 8 devices with one row each, so every group straddles shards."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.config import AttentionConfig, ConfigError, FoTConfig, ModelConfig
from jaxllama.mixers import spec_of
from jaxllama.training.config import DataConfig
from jaxllama.training.data import (
    DataLoader,
    byte_tokenizer,
    check_packing,
    pack_group,
    python_text,
    rows_of_groups,
)

TOK = byte_tokenizer()
EOS = TOK.eos_token_id


def reference_group(tokens, weights, docs, k):
    """Row r, column i of a group, written out from the definition, one token at a time."""
    t = (len(tokens) - 1) // k
    rank = {}  # document -> 1, 2, ... in order of first appearance among the inputs
    out = {name: np.zeros((k, t), dtype) for name, dtype in
           (("inputs", int), ("targets", int), ("positions", int), ("segment_ids", int),
            ("weights", float))}
    for r in range(k):
        for i in range(t):
            a = r * t + i  # stream index of the input token
            rank.setdefault(docs[a], len(rank) + 1)
            out["inputs"][r, i], out["targets"][r, i] = tokens[a], tokens[a + 1]
            out["segment_ids"][r, i] = rank[docs[a]]
            start = r * t  # positions count from the row start or the document start
            while a - 1 >= start and docs[a - 1] == docs[a]:
                a -= 1
            out["positions"][r, i] = r * t + i - a
            same = docs[r * t + i + 1] == docs[r * t + i]
            out["weights"][r, i] = weights[r * t + i + 1] if same else 0.0
    return out


def test_pack_group_matches_the_definition():
    # doc 0: 9 tokens, doc 1: 2 tokens, doc 2: 6 tokens (a prompt token of weight 0 first)
    lengths = [9, 2, 6]
    docs = np.repeat(np.arange(3), lengths)
    tokens = 100 + np.arange(len(docs))
    weights = np.ones(len(docs), np.float32)
    weights[11] = 0.0
    k = 4  # rows of 4 tokens: one group = 16 inputs + 1
    got = pack_group(tokens, weights, docs, k)
    want = reference_group(tokens, weights, docs, k)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # the same thing as literal rows: doc 0 spans rows 0-2 with one id, positions restart per row
    np.testing.assert_array_equal(got["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1],
                                                       [1, 2, 2, 3], [3, 3, 3, 3]])
    np.testing.assert_array_equal(got["positions"], [[0, 1, 2, 3], [0, 1, 2, 3],
                                                     [0, 0, 1, 0], [0, 1, 2, 3]])
    np.testing.assert_array_equal(got["weights"], [[1, 1, 1, 1], [1, 1, 1, 1],
                                                   [0, 1, 0, 1], [1, 1, 1, 1]])
    # row r + 1 continues row r of the stream
    np.testing.assert_array_equal(got["inputs"][1:, 0], got["targets"][:-1, -1])


def _corpus(tmp_path, **kw):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    docs = [" ".join(rng.choice(words, int(rng.integers(3, 40)))) for _ in range(60)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    return DataConfig(paths=(str(tmp_path / "c.txt"),), doc_separator="\n\n", seed=1,
                      packing="doc_aware", **kw)


def test_loader_groups_ids_processes_and_grad_accum(tmp_path):
    k, t = 3, 16
    cfg = _corpus(tmp_path, doc_aware_k=k)
    batch = next(DataLoader(cfg, TOK, t, 4 * k, eos=EOS))
    assert batch["inputs"].shape == (4 * k, t)
    seg = batch["segment_ids"]
    for j in range(4):  # group j's ids lie in its own range; its rows continue each other
        rows = slice(j * k, (j + 1) * k)
        assert seg[rows].min() > j * k * t and seg[rows].max() <= (j + 1) * k * t
        np.testing.assert_array_equal(batch["inputs"][rows][1:, 0],
                                      batch["targets"][rows][:-1, -1])
    assert (batch["positions"][:, 0] == 0).all()
    # two processes: whole groups each, ids still disjoint across the global batch
    parts = [next(DataLoader(cfg, TOK, t, 4 * k, eos=EOS, process_index=p, process_count=2))
             for p in range(2)]
    glob = np.concatenate([p["segment_ids"] for p in parts])
    for j in range(4):
        assert glob[j * k:(j + 1) * k].min() > j * k * t
        assert glob[j * k:(j + 1) * k].max() <= (j + 1) * k * t
    # grad_accum 2: micro-batch j (every 2nd row) is the contiguous block j of the plain batch
    acc = next(DataLoader(cfg, TOK, t, 4 * k, eos=EOS, grad_accum=2))
    for name in batch:
        for j in range(2):
            np.testing.assert_array_equal(acc[name][j::2], batch[name][j * 2 * k:(j + 1) * 2 * k])


def test_rows_of_groups_literal():
    g = {"inputs": np.zeros((2, 2, 3), np.int32),
         "segment_ids": np.array([[[1, 1, 2], [2, 2, 2]], [[1, 2, 2], [3, 3, 3]]], np.int32)}
    out = rows_of_groups(g, first_group=1)
    np.testing.assert_array_equal(out["segment_ids"], [[7, 7, 8], [8, 8, 8],
                                                       [13, 14, 14], [15, 15, 15]])


@pytest.fixture(scope="module")
def memory_layer():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, layer_pattern=("fot",),
                      max_position_embeddings=16,
                      attention=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16),
                      fot=FoTConfig(last_context_length=8, mem_dtype="float32",
                                    cross_batch_range=2))
    layer_cfg = spec_of("fot").config(cfg)
    module = spec_of("fot").module(cfg=layer_cfg)
    return module, jax.jit(lambda p, x, pos, seg: module.apply({"params": p}, x, pos, None,
                                                               seg)[0])


def test_memory_layer_reads_only_its_own_document(tmp_path, memory_layer):
    """The loader's ids and the mixer agree: the output of row b changes with a row r != b
    exactly when r is one of the 2 rows before b and shares a document (segment id) with it."""
    module, apply = memory_layer
    k, t = 3, 16
    batch = next(DataLoader(_corpus(tmp_path, doc_aware_k=k), TOK, t, 2 * k, eos=EOS))
    seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"])
    x = jax.random.normal(jax.random.key(0), (2 * k, t, 32))
    params = nn.meta.unbox(module.init(jax.random.key(1), x, pos)["params"])
    base = np.asarray(apply(params, x, pos, seg))
    reads = np.zeros((2 * k, 2 * k), bool)  # reads[b, r]: row b's output moves with row r
    for r in range(2 * k):
        moved = np.asarray(apply(params, x.at[r].add(1.0), pos, seg))
        reads[:, r] = np.abs(moved - base).max(axis=(1, 2)) > 1e-6
    s = batch["segment_ids"]
    for b in range(2 * k):
        for r in range(2 * k):
            shares = bool(np.intersect1d(s[b], s[r]).size)
            assert reads[b, r] == (r == b or (b - 2 <= r < b and shares)), (b, r)
    assert reads[1, 0] and not reads[k, k - 1]  # within a group yes, across groups never


def test_config_errors():
    with pytest.raises(ConfigError, match="data.packing: 'plain' with model.fot.cross_batch_range"):
        check_packing(DataConfig(paths=("x",)), 2, 8)
    cfg = DataConfig(paths=("x",), packing="doc_aware", doc_aware_k=2)
    with pytest.raises(ConfigError, match="data.doc_aware_k: 2 must exceed model.fot.cross_bat"):
        check_packing(cfg, 2, 8)
    with pytest.raises(ConfigError, match="train.batch_size: 6 is not a multiple of data.doc_a"):
        check_packing(cfg.__class__(paths=("x",), packing="doc_aware", doc_aware_k=4), 2, 6)
    with pytest.raises(ConfigError, match="train.grad_accum 2 = 8"):
        check_packing(cfg.__class__(paths=("x",), packing="doc_aware", doc_aware_k=4), 2, 12,
                      grad_accum=2)
    check_packing(DataConfig(paths=("x",), packing="doc_aware", doc_aware_k=3), 2, 6)  # fine
    with pytest.raises(ConfigError, match="data.doc_aware_k: 0 with data.packing 'doc_aware'"):
        DataConfig(paths=("x",), packing="doc_aware")
    with pytest.raises(ConfigError, match="data.packing: 'docs' is not one of"):
        DataConfig(paths=("x",), packing="docs")
    with pytest.raises(ConfigError, match="data.paths: python:os.nothing_here: no importable"):
        python_text("python:os.nothing_here")
    assert len(python_text("python:pydoc_data.topics.topics")) > 50


def _tiny_run(tmp_path, **data):
    from jaxllama.training.config import train_config_from_dict

    return train_config_from_dict({
        "model": {"vocab_size": 264, "hidden_size": 32, "intermediate_size": 64,
                  "layer_pattern": ["fot_local", "fot"], "max_position_embeddings": 32,
                  "attention": {"num_heads": 2, "num_kv_heads": 1, "head_dim": 16},
                  "fot": {"last_context_length": 16, "mem_dtype": "float32",
                          "cross_batch_range": 2}},
        "data": {"paths": ["tests/training/data/tiny_corpus.txt"], "doc_separator": "\n\n",
                 "tokenizer": "bytes", **data},
        "train": {"steps": 25, "seq_len": 32, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3,
                  "compute_dtype": "float32", "loss_chunk": 0, "weight_decay": 0.0},
        "log": {"dir": str(tmp_path), "progress": False, "tensorboard": False},
    }, "tiny-fot")


def test_plain_packing_with_cross_batch_is_refused(tmp_path):
    from jaxllama.training.trainer import run

    with pytest.raises(ConfigError, match="tiny-fot: data.packing: 'plain' with model.fot.cross"):
        run(_tiny_run(tmp_path))


def test_tiny_doc_aware_cross_batch_run_lowers_the_loss(tmp_path):
    """FoT layers (fot_local, fot), doc_aware k=4, cross_batch_range 2, 8 rows on the 8-device
    data axis (every group straddles shards): 25 Adam steps lower the loss."""
    from jaxllama.training.trainer import run

    out = run(_tiny_run(tmp_path, packing="doc_aware", doc_aware_k=4))
    losses = out["losses"]
    assert sorted(losses) == list(range(1, 26))
    first, last = np.mean([losses[i] for i in (1, 2)]), np.mean([losses[i] for i in (24, 25)])
    assert last < first - 1.0, (first, last)
