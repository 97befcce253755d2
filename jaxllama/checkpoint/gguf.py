"""GGUF files of Llama architecture (llama.cpp): config from metadata, weights dequantized with the
`gguf` package, tokenizer and chat template through transformers' GGUF tokenizer support.

llama.cpp's converter reorders the rows of the Q and K projections of every head from HF's rotate-
half layout to interleaved pairs; reading undoes that so the weights match HF's layout again. Llama
3.1 files store their RoPE scaling as a `rope_freqs.weight` tensor of per-frequency divisors; it is
recognised as llama3 scaling when it matches, else kept exactly as a longrope table.

Dequantizing takes seconds (and parsing the metadata of a 49K-token vocabulary a few more), so the
first load writes the dequantized weights, in HF layout and the requested dtype, with the config
and generation config, to one safetensors file under jaxllama's cache (`cache_root()`), keyed by
the GGUF's path, size and modification time; later loads memory-map that file and never open the
GGUF. `JAXLLAMA_GGUF_CACHE=0` turns the weights cache off (it takes 4 bytes per parameter in
float32, 2 in bfloat16). The tokenizer built from the metadata is cached the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxllama.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    TensorSource,
    assemble_params,
    quiet,
    with_dtype,
    with_overrides,
)
from jaxllama.config import (
    DEFAULT_KIND,
    AttentionConfig,
    ConfigError,
    ModelConfig,
    RopeConfig,
    model_config_from_dict,
    to_dict,
)

log = logging.getLogger(__name__)

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name of a llama.cpp tensor name (None when it has no HF counterpart)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}"
    return None


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head, rows (pair i, half j) -> HF's (half j, pair i)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_reader(path: Path):
    """`gguf.GGUFReader` over a plain-ndarray view of the memory map: the reader slices its buffer
    once per metadata entry (about 100k times for a vocabulary), and np.memmap slices are several
    times slower than ndarray ones. Tensor data stays memory-mapped, nothing is copied."""
    import gguf

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    try:
        return Reader(str(path))
    except Exception as e:  # noqa: BLE001 - any reader error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable GGUF file ({msg})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - any reader error
        raise CheckpointError(f"GGUF metadata {key}: unreadable value") from None


def _fit_llama3(divisors: np.ndarray, inv_freq: np.ndarray, orig: int) -> RopeConfig | None:
    """llama3 scaling parameters reproducing `inv_freq / divisors`, or None when none do."""
    factor = float(divisors.max())
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
        rope = RopeConfig(type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                          original_max_position_embeddings=orig)
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - low) / (high - low)
        want = np.where(wavelen < orig / high, inv_freq,
                        np.where(wavelen > orig / low, inv_freq / factor,
                                 (1 - smooth) * inv_freq / factor + smooth * inv_freq))
        if np.allclose(inv_freq / divisors, want, rtol=1e-4, atol=0):
            return rope
    return None


def _rope(reader, arch: str, head_dim: int, max_pos: int, where: str) -> RopeConfig:
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    partial = rot / head_dim
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if factor is None and _field(reader, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", _field(reader, f"{arch}.rope.scale_linear")
    orig = int(_field(reader, f"{arch}.rope.scaling.original_context_length", 0)) or None
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        divisors = np.asarray(freqs.data, np.float64).reshape(-1)
        inv = 1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
        if divisors.shape != inv.shape:
            raise CheckpointError(f"{where}: rope_freqs.weight has {divisors.size} entries, "
                                  f"expected {inv.size}")
        fit = _fit_llama3(divisors, inv, orig or 8192)
        if fit is not None:
            return dataclasses.replace(fit, theta=theta, partial_rotary_factor=partial)
        table = tuple(float(x) for x in divisors)
        return RopeConfig(theta=theta, type="longrope", short_factor=table, long_factor=table,
                          attention_factor=1.0, original_max_position_embeddings=orig or max_pos,
                          partial_rotary_factor=partial)
    if kind in ("none", None) or factor in (None, 1.0):
        return RopeConfig(theta=theta, partial_rotary_factor=partial)
    if kind == "linear":
        return RopeConfig(theta=theta, type="linear", factor=float(factor),
                          partial_rotary_factor=partial)
    if kind == "yarn":
        betas = {k: float(v) for k, v in (
            ("beta_fast", _field(reader, f"{arch}.rope.scaling.yarn_beta_fast")),
            ("beta_slow", _field(reader, f"{arch}.rope.scaling.yarn_beta_slow"))) if v}
        return RopeConfig(theta=theta, type="yarn", factor=float(factor),
                          original_max_position_embeddings=orig or max_pos,
                          partial_rotary_factor=partial, **betas)
    raise CheckpointError(f"{where}: rope scaling type {kind!r} is not supported")


def _float32_value(value) -> float:
    """The decimal a float32 metadata value stands for: the shortest one that reads back as the
    same float32 (GGUF stores 1e-5 as float32; `float()` of it is 9.999999747378752e-06, which an
    exported config.json would then spell out)."""
    return float(str(np.float32(value)))


def config_from_gguf(reader, where: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{where}: architecture {arch!r} is not supported (llama only)")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{where}: GGUF metadata {arch}.{key} is missing")
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise CheckpointError(f"{where}: {arch}.{key} differs across layers")
            v = v[0]
        return int(v)

    d, heads = need("embedding_length"), need("attention.head_count")
    kv = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", d // heads))
    max_pos = int(_field(reader, f"{arch}.context_length", 2048))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{where}: token_embd.weight: tensor missing")
    vocab = int(_field(reader, f"{arch}.vocab_size", int(embed.shape[-1])))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    try:
        return ModelConfig(
            vocab_size=vocab, hidden_size=d, intermediate_size=need("feed_forward_length"),
            layer_pattern=(DEFAULT_KIND,) * need("block_count"), max_position_embeddings=max_pos,
            attention=AttentionConfig(
                num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                rope=_rope(reader, arch, head_dim, max_pos, where),
                bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors)),
            rms_norm_eps=_float32_value(
                _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings=tied)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _source(reader, cfg: ModelConfig, where: str) -> TensorSource:
    import gguf
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is not None:
            tensors[name] = t
        elif t.name != "rope_freqs.weight":
            raise CheckpointError(f"{t.name}: unexpected tensor in {where}")
    att = cfg.attention

    def shape(name):
        return tuple(int(x) for x in reversed(tensors[name].shape))

    def read(name):
        t = tensors[name]
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001 - any reader error
            raise CheckpointError(f"{t.name}: cannot dequantize {t.tensor_type.name} in {where} "
                                  f"({e})") from None
        a = np.asarray(a).reshape(shape(name))
        if ".q_proj." in name:
            a = unpermute_rows(a, att.num_heads)
        elif ".k_proj." in name:
            a = unpermute_rows(a, att.num_kv_heads)
        return a

    return TensorSource({n: where for n in tensors}, shape, read, where)


def tokenizer_cache_dir(path: Path) -> Path:
    """Where the tokenizer built from `path` is kept: building it from GGUF metadata takes seconds,
    loading the saved files a fraction of one. Keyed by the file's absolute path, size and mtime;
    `JAXLLAMA_CACHE` moves the cache root (default ~/.cache/jaxllama)."""
    return cache_root() / "gguf-tokenizers" / _file_key(path)


def cache_root() -> Path:
    """jaxllama's cache directory: `$JAXLLAMA_CACHE`, default ~/.cache/jaxllama."""
    return Path(os.environ.get("JAXLLAMA_CACHE") or Path.home() / ".cache" / "jaxllama")


def _file_key(path: Path) -> str:
    """A cache key that changes when the file is replaced or edited: absolute path, size, mtime."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def load_gguf_tokenizer(path: Path, use_cache: bool = True):
    """The fast tokenizer (chat template included) transformers builds from the GGUF metadata."""
    from transformers import AutoTokenizer
    cache = tokenizer_cache_dir(path) if use_cache else None
    if cache is not None and (cache / "tokenizer.json").is_file():
        try:
            with quiet("transformers"):
                return AutoTokenizer.from_pretrained(str(cache))
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt below
            shutil.rmtree(cache, ignore_errors=True)
    log.info("building the tokenizer from %s (once; cached)", path.name)
    try:
        with quiet("transformers"):
            if importlib.util.find_spec("torch") is None:
                tok = tokenizer_from_metadata(open_reader(path))
            else:
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - any reader error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot build a tokenizer from the GGUF ({msg})") from None
    if cache is not None:
        _store(tok, cache)
    return tok


_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                   "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def tokenizer_from_metadata(reader):
    """The tokenizer `AutoTokenizer.from_pretrained(..., gguf_file=...)` builds, without torch:
    transformers' GGUF metadata reader imports torch (for tensor dtypes), so without torch (a
    `pip install -e .` set-up) the metadata is read here with the `gguf` package and handed to
    the same converter transformers uses (`convert_gguf_tokenizer`, torch-free)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    meta = {k: _field(reader, k) for k in reader.fields if k.startswith("tokenizer.")}
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokens, config = groups["tokenizer"], groups["tokenizer_config"]
    if tokens.get("tokenizer_type") == "llama":  # as transformers: llama.cpp adds BOS there
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        tid = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokens["tokens"][int(tid)] if tid is not None else None
    backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), tokens)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def _store(tok, cache: Path) -> None:
    """Save into a temporary sibling, then rename: readers never see a half-written entry. A cache
    that cannot be written is skipped."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    except OSError:
        return
    try:
        tok.save_pretrained(str(tmp))
        os.rename(tmp, cache)  # fails if another process got there first: theirs is as good
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def generation_from_gguf(reader) -> dict:
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = _field(reader, f"tokenizer.ggml.{key}")
        if v is not None and int(v) not in eos:
            eos.append(int(v))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    return {"eos_token_ids": eos, "bos_token_id": None if bos is None else int(bos),
            "pad_token_id": int(pad) if pad is not None else (eos[0] if eos else None)}


# ----------------------------------------------------------------------------- dequantized cache

_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def weights_cache_file(path: Path, dtype: str) -> Path:
    """Where the weights of `path` dequantized to `dtype` are kept (see the module docstring)."""
    return cache_root() / "gguf-weights" / f"{_file_key(path)}-{dtype}.safetensors"


def _weights_cache_enabled() -> bool:
    return os.environ.get("JAXLLAMA_GGUF_CACHE", "1").strip().lower() not in ("0", "false", "no")


class _CacheWriter:
    """Writes a safetensors file tensor by tensor as the loader reads them (any order: the header,
    with every offset, is written first, each tensor then at its offset), so no second copy of the
    weights is held; renamed into place only when every tensor is in. A cache that cannot be
    written is dropped without failing the load."""

    def __init__(self, file: Path, shapes: dict[str, tuple[int, ...]], dtype: str,
                 metadata: dict[str, str]):
        import jax.numpy as jnp

        self.file, self.np_dtype = file, jnp.dtype(dtype)
        header: dict = {"__metadata__": metadata}
        offset = 0
        self.offsets = {}
        for name in sorted(shapes):
            size = int(np.prod(shapes[name], dtype=np.int64)) * self.np_dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + size]}
            self.offsets[name] = offset
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.pending = set(shapes)
        self.f = None
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
            self.f = os.fdopen(fd, "wb")
            self.f.write(len(raw).to_bytes(8, "little") + raw)
            self.f.truncate(self.base + offset)
        except OSError:
            self.abort()

    def write(self, name: str, a: np.ndarray) -> None:
        if self.f is None:
            return
        try:
            self.f.seek(self.base + self.offsets[name])
            self.f.write(np.ascontiguousarray(a, self.np_dtype).tobytes())
            self.pending.discard(name)
        except OSError:
            self.abort()

    def commit(self) -> None:
        if self.f is None or self.pending:
            self.abort()
            return
        try:
            self.f.close()
            os.replace(self.tmp, self.file)
        except OSError:
            self.abort()
        self.f = None

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if getattr(self, "tmp", None):
            Path(self.tmp).unlink(missing_ok=True)


def _cached_source(file: Path):
    """(config, generation config, has vocabulary, TensorSource) of a cache file, or None when
    there is none or it is unreadable (then it is removed)."""
    if not file.is_file():
        return None
    from safetensors import safe_open

    try:
        f = safe_open(str(file), framework="np")
        meta = f.metadata() or {}
        cfg = model_config_from_dict(json.loads(meta["config"]), "cached config")
        gen = json.loads(meta["generation"])
        has_vocab = meta["has_vocab"] == "1"
        names = list(f.keys())
    except Exception:  # noqa: BLE001 - a damaged entry is rebuilt from the GGUF
        file.unlink(missing_ok=True)
        return None
    src = TensorSource({n: str(file) for n in names},
                       lambda n: tuple(f.get_slice(n).get_shape()), f.get_tensor, str(file))
    return cfg, gen, has_vocab, src


def _with_cache_writes(src: TensorSource, writer: _CacheWriter) -> TensorSource:
    def read(name):
        a = src.read(name)
        writer.write(name, a)
        return a
    return dataclasses.replace(src, read=read)


def load_gguf(path: str | os.PathLike, dtype: str = "float32", overrides=(),
              tokenizer: bool = True, cache: bool | None = None) -> Checkpoint:
    """Load a Llama-architecture GGUF file into a `Checkpoint` (weights dequantized to `dtype`;
    tokenizer None when the file carries no vocabulary). `cache` (default: on unless
    `JAXLLAMA_GGUF_CACHE=0`) reads and writes the dequantized weights cache."""
    path = Path(path)
    where = str(path)
    cache = _weights_cache_enabled() if cache is None else cache
    file = weights_cache_file(path, dtype) if cache else None
    hit = _cached_source(file) if file is not None else None
    if hit is not None:
        stored, gen, has_vocab, src = hit
        cfg = with_dtype(with_overrides(stored, overrides), dtype)
        log.info("loading %s weights dequantized earlier (%s)", dtype, file)
        try:
            params = assemble_params(cfg, src, dtype, desc=f"loading {path.name}")
        except CheckpointError:
            raise
        except Exception:  # noqa: BLE001 - a truncated or damaged entry: rebuild it
            file.unlink(missing_ok=True)
            return load_gguf(path, dtype, overrides, tokenizer, cache)
    else:
        reader = open_reader(path)
        stored = config_from_gguf(reader, where)
        gen = generation_from_gguf(reader)
        has_vocab = _field(reader, "tokenizer.ggml.model") is not None
        cfg = with_dtype(with_overrides(stored, overrides), dtype)
        src = _source(reader, stored, where)
        writer = None
        if file is not None:
            log.info("dequantizing %s to %s (once; kept in %s)", path.name, dtype, file.parent)
            meta = {"config": json.dumps(to_dict(stored)), "generation": json.dumps(gen),
                    "has_vocab": "1" if has_vocab else "0", "source": where}
            writer = _CacheWriter(file, {n: src.shape(n) for n in src.files}, dtype, meta)
            src = _with_cache_writes(src, writer)
        else:
            log.info("dequantizing %s to %s", path.name, dtype)
        try:
            params = assemble_params(cfg, src, dtype, desc=f"loading {path.name}")
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.commit()
    tok = load_gguf_tokenizer(path) if tokenizer and has_vocab else None
    return Checkpoint(cfg, params, tok, gen, where)
