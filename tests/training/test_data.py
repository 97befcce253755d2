"""Packing, loss masks, file formats, process sharding, mid-epoch resume and passkey examples."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxllama.config import ConfigError
from jaxllama.parallel import from_zigzag
from jaxllama.training.config import DataConfig, MemoryTokensConfig
from jaxllama.training.data import (
    DataLoader,
    PasskeySource,
    build_source,
    byte_tokenizer,
    pack_window,
    read_documents,
)

TOK = byte_tokenizer()
EOS = TOK.eos_token_id


def test_byte_tokenizer_is_bytes():
    text = "héllo\n\tx"
    assert TOK.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert TOK.decode(TOK.encode(text, add_special_tokens=False)) == text
    assert (len(TOK), EOS, TOK.convert_tokens_to_ids("<|memory|>")) == (260, 256, 259)


def test_pack_window_segments_positions_and_weights():
    # stream: doc 0 = [10 11 12], doc 1 = [20 21 22 23]; target weight of the prompt token 20 is 0
    tokens = np.array([10, 11, 12, 20, 21, 22, 23])
    weights = np.array([1, 1, 1, 0, 1, 1, 1], np.float32)
    docs = np.array([0, 0, 0, 1, 1, 1, 1])
    ex = pack_window(tokens, weights, docs)
    np.testing.assert_array_equal(ex["inputs"], [10, 11, 12, 20, 21, 22])
    np.testing.assert_array_equal(ex["targets"], [11, 12, 20, 21, 22, 23])
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2])
    # 12 -> 20 crosses documents; 20 is a prompt token (weight 0) anyway
    np.testing.assert_array_equal(ex["weights"], [1, 1, 0, 1, 1, 1])


def test_jsonl_prompt_tokens_carry_no_loss(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "Q: 2+2?", "text": " A: 4"}, {"prompt": "Q: hi", "text": " A: hello"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(paths=(str(path),), prompt_field="prompt")
    src = build_source(cfg, TOK, 8, EOS)
    ex = src[0]
    prompt_len = len("Q: 2+2?")
    # targets 1..prompt_len-1 are prompt tokens: weight 0; the answer and EOS are learned
    assert ex["weights"][: prompt_len - 1].sum() == 0
    assert ex["weights"][prompt_len - 1:].sum() == 8 - (prompt_len - 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2: not valid JSON"):
        read_documents(DataConfig(paths=(str(bad),)))


def test_parquet_and_text_documents(tmp_path):
    pq.write_table(pa.table({"body": ["alpha beta", "gamma"], "n": [1, 2]}), tmp_path / "d.parquet")
    (tmp_path / "t.txt").write_text("one\n\ntwo\n\n\nthree")
    docs = read_documents(DataConfig(paths=(str(tmp_path / "d.parquet"), str(tmp_path / "t.txt")),
                                     text_field="body", doc_separator="\n\n"))
    assert [d[1].strip() for d in docs] == ["alpha beta", "gamma", "one", "two", "three"]
    with pytest.raises(ConfigError, match="cannot read parquet columns"):
        read_documents(DataConfig(paths=(str(tmp_path / "d.parquet"),), text_field="missing"))


def test_memory_tokens_are_never_targets(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij")
    cfg = DataConfig(paths=(str(tmp_path / "t.txt"),),
                     memory_tokens=MemoryTokensConfig(episode_length=4, per_episode=2))
    ex = build_source(cfg, TOK, 14, EOS, memory_token_id=259)[0]
    # a b c d M M e f g h M M i j EOS
    np.testing.assert_array_equal(ex["inputs"][:6], [97, 98, 99, 100, 259, 259])
    assert np.all(ex["weights"][ex["targets"] == 259] == 0)
    assert ex["weights"][ex["targets"] != 259].min() == 1


def _corpus(tmp_path, n_docs=40):
    rng = np.random.default_rng(0)
    words = ["river", "stone", "light", "bread", "clock", "rain", "map", "snow"]
    text = "\n\n".join(f"{i:03d} " + " ".join(rng.choice(words, rng.integers(3, 12)))
                       for i in range(n_docs))
    (tmp_path / "c.txt").write_text(text)
    return DataConfig(paths=(str(tmp_path / "c.txt"),), doc_separator="\n\n", seed=3)


def test_loader_shards_processes_and_resumes_mid_epoch(tmp_path):
    cfg = _corpus(tmp_path)
    single = DataLoader(cfg, TOK, 16, 4, eos=EOS)
    n = len(single.source)
    batches = [next(single) for _ in range(n // 4 + 3)]  # runs into the second epoch
    # every window once per epoch, in a shuffled order
    first_epoch = np.concatenate([b["inputs"] for b in batches])[:n]
    assert len({row.tobytes() for row in first_epoch}) == n
    assert not np.array_equal(first_epoch[0], single.source[0]["inputs"]) or n < 3
    # two processes: each sees half of every global batch, together the same rows
    parts = [DataLoader(cfg, TOK, 16, 4, eos=EOS, process_index=p, process_count=2)
             for p in range(2)]
    for b in batches[:3]:
        got = np.concatenate([next(p)["inputs"] for p in parts])
        assert sorted(map(bytes, got)) == sorted(map(bytes, b["inputs"]))
    # resume: a fresh loader with the saved state continues with the very next batch
    fresh = DataLoader(cfg, TOK, 16, 4, eos=EOS)
    for _ in range(5):
        next(fresh)
    state = fresh.get_state()
    expected = next(fresh)
    restored = DataLoader(cfg, TOK, 16, 4, eos=EOS)
    restored.set_state(json.loads(json.dumps(state)))  # as stored in a checkpoint
    got = next(restored)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_loader_applies_zigzag_layout(tmp_path):
    cfg = _corpus(tmp_path)
    plain = next(DataLoader(cfg, TOK, 16, 2, eos=EOS))
    zig = next(DataLoader(cfg, TOK, 16, 2, eos=EOS, seq_ways=4))
    for k in plain:
        np.testing.assert_array_equal(from_zigzag(zig[k], 4), plain[k])
    assert not np.array_equal(zig["positions"], plain["positions"])


def test_passkey_examples():
    src = PasskeySource(TOK, 256, num_examples=10, digits=5, seed=1, eos=EOS)
    toks, _, key = src.example(4)
    assert len(toks) == 257 and 10_000 <= key < 100_000
    text = TOK.decode(toks, skip_special_tokens=True)
    assert text.count(str(key)) == 3 and text.rstrip().endswith(f"The pass key is {key}.")
    ex = src[4]
    answer = ex["targets"][ex["weights"] > 0]
    assert TOK.decode(answer) == f" {key}.<|eos|>"  # only the answer and EOS carry loss
    assert ex["weights"].sum() == len(f" {key}.") + 1
    depths = {TOK.decode(src.example(i)[0]).index(" The pass key") for i in range(10)}
    assert len(depths) > 5  # the needle moves
    np.testing.assert_array_equal(src[4]["inputs"], ex["inputs"])  # deterministic


def test_package_paths_read_files_installed_with_a_package():
    import idlelib
    from pathlib import Path

    want = (Path(idlelib.__file__).parent / "TODO.txt").read_text(encoding="utf-8")
    docs = read_documents(DataConfig(paths=("package:idlelib/TODO.txt",), format="text"))
    assert [d[1] for d in docs] == [want]
    with pytest.raises(ConfigError, match="package 'idlelib' has no file 'NOPE.txt'"):
        read_documents(DataConfig(paths=("package:idlelib/NOPE.txt",)))
    with pytest.raises(ConfigError, match="no importable package 'no_such_pkg_xyz'"):
        read_documents(DataConfig(paths=("package:no_such_pkg_xyz/a.txt",)))
