"""Training data: local text / JSONL / parquet files or synthetic passkey retrieval, packed into
fixed-length sequences, shuffled, sharded across processes and resumable mid-epoch (grain).

Packing: every document becomes `tokens + [eos]` (prompt tokens first when a prompt column is
given); the documents of the whole corpus form one token stream, cut into windows of `seq_len + 1`
tokens that overlap by one (inputs = window[:-1], targets = window[1:]). Inside a window each
document gets its own segment id (1, 2, ...) and positions restart at 0, so attention never
crosses documents. A target gets loss weight 0 when it is a prompt token, a memory token, or the
first token of the next document.

Document-aware packing (`data.packing: doc_aware`, for FoT cross-batch training, METHODS section
7): the stream is cut into groups of k = `data.doc_aware_k` consecutive rows, k * seq_len + 1
tokens each (consecutive groups overlap by one token). Row r of a group is the stream window that
starts at token r * seq_len of the group, so a document longer than a row continues in the next
row: its k consecutive parts lie in k consecutive rows. Positions restart at 0 at every row start
(and every document start): a row is one local context, and a memory layer reads the rows before
it with keys encoded as if at position 0. Segment ids are counted over the whole group, so a
document keeps one id in every row it spans, and each group of the batch gets its own range of
ids (group j of the global batch: ids in j * k * seq_len + 1 .. (j + 1) * k * seq_len): the
cross-batch read (`mixers/fot_attention.py: cross_batch`, which lets a query see another row's key
only at an equal segment id) never crosses into another document or another group.

Cross-batch rows on the data axis: batches are placed on (data, fsdp) in row order (row b on shard
b // (B / shards)). A group may straddle a shard edge: the memory layer shifts keys and values
along the whole (global) batch axis, so XLA brings the d rows before a shard's first row from its
neighbour (`tests/training/test_cross_batch.py`: sharded == unsharded with 2-row documents, one
row per device). A group never straddles processes: each process builds whole groups of its own
(the local batch must hold whole groups). With `train.grad_accum` A > 1 a micro-batch takes every
A-th row (`training/step.py`), so the loader interleaves the batch (micro-batch j gets the
contiguous block j of rows, whole groups in order).

Pipeline: `grain.MapDataset` over the windows (doc_aware: the groups) -> shuffle (reseeded every
epoch) -> repeat -> every `process_count`-th window from `process_index` -> zigzag layout for ring
attention -> batch (doc_aware: groups -> rows, group id ranges, grad_accum interleave). The
iterator state (`get_state()`, a small dict) goes into each checkpoint; restoring it continues
with exactly the batch that would have come next. The whole corpus is tokenized when
the loader is built: meant for local files of up to a few hundred MB, not web-scale corpora.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxllama.config import ConfigError
from jaxllama.parallel.layout import to_zigzag
from jaxllama.training.config import DataConfig

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


# ----------------------------------------------------------------------------- tokenizers


BYTE_SPECIALS = ("<|eos|>", "<|bos|>", "<|pad|>", "<|memory|>")


def _byte_chars() -> dict[int, str]:
    """The byte-level BPE convention: printable Latin-1 bytes stand for themselves, the other
    bytes for the code points 256, 257, ... in order (so every byte is one visible character)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        out[b] = chr(b) if b in keep else chr(256 + n)
        n += b not in keep
    return out


def byte_tokenizer():
    """A real `PreTrainedTokenizerFast` whose ids are UTF-8 bytes (0..255) plus `<|eos|>` 256,
    `<|bos|>` 257, `<|pad|>` 258, `<|memory|>` 259: tiny runs and tests need no downloaded vocab,
    and it saves and loads like any HF tokenizer (HF export, orbax checkpoints)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _byte_chars().items()}
    vocab.update({s: 256 + i for i, s in enumerate(BYTE_SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", bos_token="<|bos|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|memory|>"])


def load_tokenizer(spec: str, checkpoint_tokenizer=None):
    """`checkpoint` (the initial checkpoint's), `bytes`, or an HF tokenizer directory."""
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "checkpoint":
        if checkpoint_tokenizer is None:
            raise ConfigError("data.tokenizer: `checkpoint` needs init.checkpoint (or use `bytes` "
                              "or a tokenizer directory)")
        return checkpoint_tokenizer
    if not Path(spec).is_dir():
        raise ConfigError(f"data.tokenizer: {spec}: no such tokenizer directory")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def eos_id(tokenizer, generation_config: dict | None = None) -> int:
    ids = (generation_config or {}).get("eos_token_ids") or []
    if ids:
        return int(ids[0])
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError("data.tokenizer: the tokenizer has no end-of-sequence token")
    return int(tokenizer.eos_token_id)


# ----------------------------------------------------------------------------- documents


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise ConfigError(f"data.paths: {path}: cannot tell the format from the suffix (set "
                      "data.format)")


def python_text(spec: str) -> list[str]:
    """`python:MODULE.NAME`: text that ships with an installed package, e.g.
    `python:pydoc_data.topics.topics` (CPython's Python Language Reference, a dict of topics): a
    string is one document, a dict or list of strings one document per value (sorted keys)."""
    import importlib

    module, _, name = spec.removeprefix("python:").rpartition(".")
    try:
        value = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"data.paths: {spec}: no importable attribute {name!r} of module "
                          f"{module!r}") from None
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    values = [value] if isinstance(value, str) else list(value)
    if not values or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"data.paths: {spec}: not a string, nor a dict or list of strings")
    return values


def package_file(spec: str) -> Path:
    """`package:PACKAGE/REL/PATH`: a data file installed with a package, e.g.
    `package:idlelib/NEWS.txt` (prose that ships with CPython), found wherever that package is
    installed (so a recipe never names one machine's site-packages)."""
    from importlib import resources

    package, _, rel = spec.removeprefix("package:").partition("/")
    try:
        path = Path(str(resources.files(package).joinpath(rel)))
    except (ImportError, TypeError, ValueError):
        raise ConfigError(f"data.paths: {spec}: no importable package {package!r}") from None
    if not rel or not path.is_file():
        raise ConfigError(f"data.paths: {spec}: package {package!r} has no file {rel!r}")
    return path


def read_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """[(prompt, text)] from every file of `cfg.paths` (or `python:MODULE.NAME` text, see
    `python_text`, or `package:PACKAGE/FILE`, see `package_file`), in order (prompt may be '')."""
    docs: list[tuple[str, str]] = []
    for name in cfg.paths:
        if name.startswith("python:"):
            docs += [("", t) for t in python_text(name) if t.strip()]
            continue
        path = package_file(name) if name.startswith("package:") else Path(name)
        if not path.is_file():
            raise ConfigError(f"data.paths: {path}: no such file")
        fmt = _format_of(path, cfg.format)
        if fmt == "text":
            text = path.read_text(encoding="utf-8")
            parts = text.split(cfg.doc_separator) if cfg.doc_separator else [text]
            docs += [("", p) for p in parts if p.strip()]
        elif fmt == "jsonl":
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        docs.append(_record(_json_line(line, path, i), cfg, f"{path}:{i + 1}"))
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            columns = [cfg.text_field] + ([cfg.prompt_field] if cfg.prompt_field else [])
            try:
                table = pq.read_table(path, columns=columns).to_pylist()
            except Exception as e:  # noqa: BLE001 - pyarrow raises many types for bad files/columns
                raise ConfigError(f"data.paths: {path}: cannot read parquet columns {columns}: "
                                  f"{str(e).splitlines()[0]}") from None
            docs += [_record(r, cfg, f"{path} row {i}") for i, r in enumerate(table)]
    return docs


def _json_line(line: str, path: Path, i: int) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        raise ConfigError(f"data.paths: {path}:{i + 1}: not valid JSON") from None
    if not isinstance(rec, dict):
        raise ConfigError(f"data.paths: {path}:{i + 1}: expected a JSON object")
    return rec


def _record(rec: dict, cfg: DataConfig, where: str) -> tuple[str, str]:
    if not isinstance(rec.get(cfg.text_field), str):
        raise ConfigError(f"data.text_field: {where}: no string field {cfg.text_field!r}")
    prompt = rec.get(cfg.prompt_field, "") if cfg.prompt_field else ""
    if not isinstance(prompt, str):
        raise ConfigError(f"data.prompt_field: {where}: {cfg.prompt_field!r} is not a string")
    return prompt, rec[cfg.text_field]


# ----------------------------------------------------------------------------- packing


def tokenize_stream(docs, tokenizer, eos: int, memory: tuple[int, int, int] | None = None):
    """One stream over all documents: tokens [N], target weights [N] (weight of token i when it
    is predicted), document index [N]. `memory` = (episode_length, per_episode, token id)."""
    toks, weights, doc_ids = [], [], []
    for d, (prompt, text) in enumerate(docs):
        p = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        body = tokenizer.encode(text, add_special_tokens=False) + [eos]
        ids = np.asarray(p + body, np.int32)
        w = np.concatenate([np.zeros(len(p), np.float32), np.ones(len(body), np.float32)])
        if memory is not None:
            ids, w = _with_memory_tokens(ids, w, *memory)
        toks.append(ids)
        weights.append(w)
        doc_ids.append(np.full(len(ids), d, np.int32))
    if not toks:
        raise ConfigError("data.paths: no documents found")
    return np.concatenate(toks), np.concatenate(weights), np.concatenate(doc_ids)


def _with_memory_tokens(ids, w, episode: int, per_episode: int, token_id: int):
    from jaxllama.memory_tokens import insert_memory_tokens, memory_token_loss_mask

    new_ids = np.asarray(insert_memory_tokens(ids, episode, per_episode, token_id), np.int32)
    keep = np.asarray(memory_token_loss_mask(new_ids, token_id))
    if keep.sum() != len(ids):
        raise ConfigError(f"data.memory_tokens.token_id: {token_id} occurs in the text itself")
    new_w = np.zeros(len(new_ids), np.float32)
    new_w[keep] = w  # ordinary tokens keep their weights, memory tokens are never targets
    return new_ids, new_w


def pack_window(tokens, weights, doc_ids) -> dict[str, np.ndarray]:
    """One training example from a window of T + 1 stream tokens (see module docstring)."""
    inputs, targets = tokens[:-1], tokens[1:]
    d_in, d_tg = doc_ids[:-1], doc_ids[1:]
    starts = np.concatenate([[True], d_in[1:] != d_in[:-1]])
    segment_ids = np.cumsum(starts).astype(np.int32)  # 1, 2, ... per document in the window
    first = np.maximum.accumulate(np.where(starts, np.arange(len(inputs)), 0))
    positions = (np.arange(len(inputs)) - first).astype(np.int32)
    w = np.where(d_tg == d_in, weights[1:], 0.0).astype(np.float32)
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32), "weights": w,
            "positions": positions, "segment_ids": segment_ids}


class PackedWindows:
    """Random-access source of packed examples over a token stream (grain MapDataset source)."""

    def __init__(self, tokens, weights, doc_ids, seq_len: int):
        self.tokens, self.weights, self.doc_ids, self.seq_len = tokens, weights, doc_ids, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n == 0:
            raise ConfigError(f"data.paths: {len(tokens)} tokens in all, too few for one "
                              f"sequence of train.seq_len {seq_len}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        a = i * self.seq_len
        sl = slice(a, a + self.seq_len + 1)
        return pack_window(self.tokens[sl], self.weights[sl], self.doc_ids[sl])


def pack_group(tokens, weights, doc_ids, k: int) -> dict[str, np.ndarray]:
    """k consecutive rows [k T] from a span of k * T + 1 stream tokens (module docstring): row r
    is `pack_window` of tokens r*T .. r*T + T (positions restart per row), segment ids counted
    over the whole span (1, 2, ... per document, the same id in every row a document spans)."""
    t = (len(tokens) - 1) // k
    rows = [pack_window(tokens[r * t:r * t + t + 1], weights[r * t:r * t + t + 1],
                        doc_ids[r * t:r * t + t + 1]) for r in range(k)]
    out = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    d_in = doc_ids[:-1]
    starts = np.concatenate([[True], d_in[1:] != d_in[:-1]])
    out["segment_ids"] = np.cumsum(starts).astype(np.int32).reshape(k, t)
    return out


class PackedGroups(PackedWindows):
    """Random-access source of doc_aware groups: example i is `pack_group` of stream tokens
    i*k*T .. (i+1)*k*T, arrays [k T]."""

    def __init__(self, tokens, weights, doc_ids, seq_len: int, k: int):
        self.tokens, self.weights, self.doc_ids, self.k = tokens, weights, doc_ids, k
        self.seq_len = seq_len * k  # stream tokens per group (plus the one of overlap)
        self.n = (len(tokens) - 1) // self.seq_len
        if self.n == 0:
            raise ConfigError(f"data.paths: {len(tokens)} tokens in all, too few for one group "
                              f"of data.doc_aware_k {k} x train.seq_len {seq_len}")

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        a = i * self.seq_len
        sl = slice(a, a + self.seq_len + 1)
        return pack_group(self.tokens[sl], self.weights[sl], self.doc_ids[sl], self.k)


def rows_of_groups(batch: dict[str, np.ndarray], first_group: int,
                   grad_accum: int = 1) -> dict[str, np.ndarray]:
    """A batch of groups [G k T] -> rows [G*k T]: group j's segment ids moved into their own
    range (j + first_group) * k * T + 1 .., then, with grad_accum A > 1, rows interleaved so
    that micro-batch j (every A-th row, `training/step.py`) is the contiguous block j."""
    g, k, t = batch["inputs"].shape
    out = {key: v.reshape(g * k, *v.shape[2:]) for key, v in batch.items()}
    offset = (np.arange(g, dtype=np.int64) + first_group) * (k * t)
    seg = batch["segment_ids"] + np.where(batch["segment_ids"] > 0, offset[:, None, None], 0)
    out["segment_ids"] = seg.reshape(g * k, t).astype(np.int32)
    if grad_accum > 1:
        out = {key: np.swapaxes(v.reshape(grad_accum, -1, *v.shape[1:]), 0, 1).reshape(v.shape)
               for key, v in out.items()}
    return out


def check_packing(cfg: DataConfig, cross_batch_range: int, batch_size: int, grad_accum: int = 1,
                  process_count: int = 1) -> None:
    """Data packing against the model's cross-batch range (one-line ConfigError): plain packing
    restarts segment ids in every row, so cross-batch memory layers would read other documents."""
    k = cfg.doc_aware_k
    if cross_batch_range and cfg.packing != "doc_aware":
        raise ConfigError(f"data.packing: {cfg.packing!r} with model.fot.cross_batch_range "
                          f"{cross_batch_range} lets memory layers read other documents' rows "
                          f"(set data.packing: doc_aware and data.doc_aware_k > "
                          f"{cross_batch_range})")
    if cfg.packing != "doc_aware":
        return
    if cfg.format == "passkey":
        raise ConfigError("data.packing: doc_aware needs a text corpus (data.format passkey "
                          "builds single rows)")
    if cross_batch_range and k <= cross_batch_range:
        raise ConfigError(f"data.doc_aware_k: {k} must exceed model.fot.cross_batch_range "
                          f"{cross_batch_range} (a row reads the {cross_batch_range} rows "
                          f"before it)")
    per = k * process_count * grad_accum
    if batch_size % per:
        raise ConfigError(f"train.batch_size: {batch_size} is not a multiple of "
                          f"data.doc_aware_k {k} x processes {process_count} x train.grad_accum "
                          f"{grad_accum} = {per} (whole groups per process and micro-batch)")


# ----------------------------------------------------------------------------- passkey


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


class PasskeySource:
    """Synthetic passkey retrieval of exactly `seq_len` tokens: filler text with
    `The pass key is N. Remember it. N is the pass key.` at a random depth, then
    `What is the pass key? The pass key is` and the answer; only answer tokens carry loss."""

    def __init__(self, tokenizer, seq_len: int, num_examples: int = 1000, digits: int = 5,
                 seed: int = 0, eos: int | None = None):
        self.tok, self.seq_len, self.n, self.digits, self.seed = (
            tokenizer, seq_len, num_examples, digits, seed)
        self.filler = np.asarray(tokenizer.encode(FILLER, add_special_tokens=False), np.int32)
        self.eos = eos

    def __len__(self) -> int:
        return self.n

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens [T+1], target weights [T+1], passkey) of example i (deterministic)."""
        rng = np.random.default_rng([self.seed, i])
        key = int(rng.integers(10 ** (self.digits - 1), 10 ** self.digits))
        enc = lambda s: np.asarray(self.tok.encode(s, add_special_tokens=False), np.int32)
        needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        question = enc(" What is the pass key? The pass key is")
        answer = enc(f" {key}.")
        if self.eos is not None:
            answer = np.concatenate([answer, [self.eos]]).astype(np.int32)
        n_fill = self.seq_len + 1 - len(needle) - len(question) - len(answer)
        if n_fill < 1:
            raise ConfigError(f"train.seq_len: {self.seq_len} is too short for passkey examples")
        filler = np.resize(self.filler, n_fill)
        depth = int(rng.integers(0, n_fill + 1))
        toks = np.concatenate([filler[:depth], needle, filler[depth:], question, answer])
        w = np.zeros(len(toks), np.float32)
        w[-len(answer):] = 1.0
        return toks, w, key

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        toks, w, _ = self.example(i)
        return pack_window(toks, w, np.zeros(len(toks), np.int32))


# ----------------------------------------------------------------------------- loader


class DataLoader:
    """Batches [B_local T] (dicts of numpy arrays) for this process; `get_state`/`set_state`."""

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, global_batch: int, *,
                 eos: int, process_index: int = 0, process_count: int = 1, seq_ways: int = 1,
                 memory_token_id: int | None = None, grad_accum: int = 1):
        if global_batch % process_count:
            raise ConfigError(f"train.batch_size: {global_batch} is not divisible by "
                              f"{process_count} processes")
        local = global_batch // process_count
        k = cfg.doc_aware_k if cfg.packing == "doc_aware" else 1
        if cfg.packing == "doc_aware":
            check_packing(cfg, 0, global_batch, grad_accum, process_count)
        self.source = build_source(cfg, tokenizer, seq_len, eos, memory_token_id)
        ds = grain.MapDataset.source(self.source).shuffle(seed=cfg.seed).repeat(None)
        ds = ds[process_index::process_count]
        if seq_ways > 1:
            axis = 1 if cfg.packing == "doc_aware" else 0  # doc_aware examples are [k T]
            ds = ds.map(lambda ex: {n: to_zigzag(v, seq_ways, axis=axis) for n, v in ex.items()})
        ds = ds.batch(local // k, drop_remainder=True)
        if cfg.packing == "doc_aware":
            first = process_index * (local // k)
            ds = ds.map(lambda b: rows_of_groups(b, first, grad_accum))
        opts = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
        self._iter = iter(ds.to_iter_dataset(read_options=opts))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        return self._iter.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iter.set_state(state)


def build_source(cfg: DataConfig, tokenizer, seq_len: int, eos: int,
                 memory_token_id: int | None = None):
    if cfg.format == "passkey":
        pk = cfg.passkey
        n, digits = (pk.num_examples, pk.digits) if pk is not None else (1000, 5)
        return PasskeySource(tokenizer, seq_len, n, digits, cfg.seed, eos)
    memory = None
    if cfg.memory_tokens is not None:
        m = cfg.memory_tokens
        token = m.token_id if m.token_id >= 0 else memory_token_id
        if token is None:
            raise ConfigError("data.memory_tokens.token_id: the tokenizer has no <|memory|> "
                              "token; set token_id")
        memory = (m.episode_length, m.per_episode, token)
    tokens, weights, doc_ids = tokenize_stream(read_documents(cfg), tokenizer, eos, memory)
    if cfg.packing == "doc_aware":
        return PackedGroups(tokens, weights, doc_ids, seq_len, cfg.doc_aware_k)
    return PackedWindows(tokens, weights, doc_ids, seq_len)
