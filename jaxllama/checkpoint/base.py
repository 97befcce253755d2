"""What every checkpoint format shares: `Checkpoint`, `CheckpointError`, and the streaming assembly
of a params tree from a source of HF-named tensors.

Every format is read through HF Llama tensor names (`model.layers.{l}.self_attn.q_proj.weight`,
...): the safetensors reader yields them directly, the GGUF reader renames llama.cpp's names to
them. The assembly preallocates one stacked buffer per parameter in the target dtype, fills it
tensor by tensor and hands it to JAX before the next buffer is allocated, so host memory never holds
two full copies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxllama.config import (
    ConfigError,
    ModelConfig,
    apply_overrides,
    model_config_from_dict,
    to_dict,
)

# Layer kinds whose weights are exactly a Llama decoder layer (lambda only changes the mask).
LLAMA_LAYER_KINDS = ("dense", "lambda")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message is one line naming the tensor/file."""


@dataclass
class Checkpoint:
    """A loaded model: `params` follow `jaxllama.model.Transformer(config)`; `tokenizer` is a
    transformers fast tokenizer (None when the source ships none); `generation_config` holds
    `eos_token_ids` (list), `bos_token_id`, `pad_token_id` and optional sampling defaults."""

    config: ModelConfig
    params: dict
    tokenizer: Any
    generation_config: dict
    source: str


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it lives in the params tree.

    `index` is the layer's position in its stacked run (None for non-layer tensors). HF matrices are
    [out, in]; ours are [in..., out...], so a matrix is transposed then reshaped (`transpose`);
    vectors and the embedding table are only reshaped.
    """

    hf_name: str
    path: tuple[str, ...]
    index: int | None
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # this tensor's slice of the param (without the stacked axis)
    transpose: bool

    def to_param(self, a: np.ndarray) -> np.ndarray:
        return (a.T if self.transpose else a).reshape(self.shape)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(p.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(p.reshape(self.hf_shape))


def layer_locations(cfg: ModelConfig) -> list[tuple[int, int, str]]:
    """For each model layer l: (run r, index j in the run, kind)."""
    out = []
    for r, (kind, n) in enumerate(cfg.runs):
        out += [(r, j, kind) for j in range(n)]
    return out


def tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every HF tensor a Llama checkpoint of `cfg` holds, keyed by HF name."""
    a = cfg.attention
    d, f, n, k, h, v = (cfg.hidden_size, cfg.intermediate_size, a.num_heads, a.num_kv_heads,
                        a.head_dim, cfg.vocab_size)
    specs = {}

    def add(name, path, index, hf_shape, shape, transpose):
        specs[name] = TensorSpec(name, path, index, tuple(hf_shape), tuple(shape), transpose)

    add("model.embed_tokens.weight", ("embed", "embedding"), None, (v, d), (v, d), False)
    add("model.norm.weight", ("norm", "scale"), None, (d,), (d,), False)
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", ("lm_head", "kernel"), None, (v, d), (d, v), True)
    for layer, (r, j, kind) in enumerate(layer_locations(cfg)):
        if kind not in LLAMA_LAYER_KINDS:
            raise CheckpointError(f"layer {layer}: layer kind {kind!r} has no Llama checkpoint "
                                  "layout")
        pre, blk = f"model.layers.{layer}.", (f"run_{r}", "block")
        att, mlp = blk + ("mixer",), blk + ("mlp",)
        add(pre + "input_layernorm.weight", blk + ("mixer_norm", "scale"), j, (d,), (d,), False)
        add(pre + "post_attention_layernorm.weight", blk + ("mlp_norm", "scale"), j, (d,), (d,),
            False)
        for proj, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
            add(f"{pre}self_attn.{proj}.weight", att + (proj, "kernel"), j, (heads * h, d),
                (d, heads, h), True)
            if a.bias:
                add(f"{pre}self_attn.{proj}.bias", att + (proj, "bias"), j, (heads * h,),
                    (heads, h), False)
        add(pre + "self_attn.o_proj.weight", att + ("o_proj", "kernel"), j, (d, n * h), (n, h, d),
            True)
        if a.bias:
            add(pre + "self_attn.o_proj.bias", att + ("o_proj", "bias"), j, (d,), (d,), False)
        for proj, ours, hf_shape in (("gate_proj", "gate", (f, d)), ("up_proj", "up", (f, d)),
                                     ("down_proj", "down", (d, f))):
            add(f"{pre}mlp.{proj}.weight", mlp + (ours, "kernel"), j, hf_shape, hf_shape[::-1],
                True)
    return specs


def stacked_shapes(cfg: ModelConfig, specs: dict[str, TensorSpec]) -> dict[tuple, tuple]:
    """Full shape of every param leaf (run leaves get the leading layer axis)."""
    run_len = [n for _, n in cfg.runs]
    out = {}
    for s in specs.values():
        out[s.path] = s.shape if s.index is None else (run_len[int(s.path[0][4:])],) + s.shape
    return out


def get_path(tree: dict, path: tuple) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            raise CheckpointError(f"params: missing {'/'.join(path)}")
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- streaming assembly


@dataclass
class TensorSource:
    """A set of named tensors: `files[name]` labels where each lives (for errors), `shape(name)`
    reads only metadata, `read(name)` returns one numpy array."""

    files: dict[str, str]
    shape: Callable[[str], tuple[int, ...]]
    read: Callable[[str], np.ndarray]
    missing_where: str  # what a missing tensor is reported against (index file, directory, ...)


def check_tensors(specs: dict[str, TensorSpec], src: TensorSource, ignore: Iterable[str] = ()):
    """Raise on the first missing, unexpected or mis-shaped tensor (metadata only, nothing read)."""
    ignore = set(ignore)
    for name in specs:
        if name not in src.files:
            raise CheckpointError(f"{name}: tensor missing from {src.missing_where}")
    for name, where in src.files.items():
        if name not in specs and name not in ignore and not name.endswith(".rotary_emb.inv_freq"):
            raise CheckpointError(f"{name}: unexpected tensor in {where}")
    for name, spec in specs.items():
        shape = tuple(src.shape(name))
        if shape != spec.hf_shape:
            raise CheckpointError(f"{name}: shape {list(shape)} in {src.files[name]}, "
                                  f"expected {list(spec.hf_shape)} from the config")


def assemble_params(cfg: ModelConfig, src: TensorSource, dtype: str, ignore: Iterable[str] = (),
                    desc: str = "loading") -> dict:
    """Read every tensor of `cfg` from `src` into a params tree of jnp arrays in `dtype`."""
    specs = tensor_specs(cfg)
    check_tensors(specs, src, ignore)
    shapes = stacked_shapes(cfg, specs)
    by_path: dict[tuple, list[TensorSpec]] = {}
    for s in specs.values():
        by_path.setdefault(s.path, []).append(s)
    np_dtype = jnp.dtype(dtype)
    params: dict = {}
    with tqdm(total=len(specs), desc=desc, unit="tensor", disable=None, leave=False) as bar:
        for path, group in by_path.items():
            buf = np.empty(shapes[path], np_dtype)
            for s in group:
                a = src.read(s.hf_name)
                if not np.issubdtype(a.dtype, np.floating) and a.dtype != jnp.bfloat16:
                    raise CheckpointError(f"{s.hf_name}: dtype {a.dtype} in {src.files[s.hf_name]} "
                                          "is not a float type")
                if s.index is None:
                    buf[...] = s.to_param(a)
                else:
                    buf[s.index] = s.to_param(a)
                bar.update(1)
            set_path(params, path, jnp.asarray(buf))
            del buf
    return params


def export_tensors(cfg: ModelConfig, params: dict) -> Iterable[tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every tensor, one at a time, in HF order."""
    specs = tensor_specs(cfg)
    shapes = stacked_shapes(cfg, specs)
    for path, shape in shapes.items():
        got = tuple(get_path(params, path).shape)
        if got != shape:
            raise CheckpointError(f"params/{'/'.join(path)}: shape {list(got)}, "
                                  f"expected {list(shape)}")
    for name, s in specs.items():
        leaf = get_path(params, s.path)
        p = np.asarray(leaf if s.index is None else leaf[s.index])
        yield name, s.to_hf(p)


# ----------------------------------------------------------------------------- config overrides


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def with_overrides(cfg: ModelConfig, overrides: Iterable[str], where: str = "overrides"
                   ) -> ModelConfig:
    """Apply dotted `model.x.y=value` strings (the `model.` prefix is optional) to `cfg`."""
    overrides = list(overrides)
    if not overrides:
        return cfg
    data = _drop_none(to_dict(cfg))
    data["num_layers"] = cfg.num_layers  # so `layer_pattern=lambda` means every layer
    tree = {"model": data}
    try:
        apply_overrides(tree, [o if o.startswith("model.") else f"model.{o}" for o in overrides])
        return model_config_from_dict(tree["model"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def with_dtype(cfg: ModelConfig, dtype: str) -> ModelConfig:
    return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def quiet(*loggers: str):
    """Silence the INFO/WARNING chatter of third-party readers (transformers, absl/orbax) for the
    duration of one call, restoring the caller's levels afterwards."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


# ----------------------------------------------------------------------------- atomic output


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh temporary sibling of `out_dir`; on success it replaces `out_dir`, on any
    error it is removed, so a failed write leaves nothing half-written. An existing non-empty
    `out_dir` is an error unless `overwrite`."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: output directory is not empty (use overwrite)")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: parent directory does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def relayout(params: dict, old: ModelConfig, new: ModelConfig) -> dict:
    """Regroup stacked layer weights when overrides change `cfg.runs` (e.g. dense*2,lambda*28)."""
    old_specs, new_specs = tensor_specs(old), tensor_specs(new)
    if stacked_shapes(old, old_specs) == stacked_shapes(new, new_specs):
        return params
    if set(old_specs) != set(new_specs):
        raise CheckpointError("overrides: change the set of checkpoint tensors; only the layer "
                              "pattern and shape-preserving fields may be overridden")
    groups: dict[tuple, list[TensorSpec]] = {}
    for s in new_specs.values():
        groups.setdefault(s.path, []).append(s)
    out: dict = {}
    for path, group in groups.items():
        parts = []
        for s in group:
            o = old_specs[s.hf_name]
            if o.shape != s.shape:
                raise CheckpointError(f"overrides: {s.hf_name} would change shape "
                                      f"{list(o.shape)} -> {list(s.shape)}")
            leaf = get_path(params, o.path)
            parts.append(leaf if o.index is None else leaf[o.index])
        set_path(out, path, parts[0] if group[0].index is None else jnp.stack(parts))
    return out


def _default_permissions(root: Path) -> None:
    """mkdtemp (and some writers) create owner-only entries; give the finished tree the permissions
    a plain mkdir/open would (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
