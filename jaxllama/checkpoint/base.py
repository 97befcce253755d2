"""What every checkpoint format shares: `Checkpoint`, `CheckpointError`, and the streaming assembly
of a params tree from a source of HF-named tensors.

HF and GGUF are read through HF Llama tensor names (`model.layers.{l}.self_attn.q_proj.weight`,
...): the safetensors reader yields them directly, the GGUF reader renames llama.cpp's names to
them. The table of names (`tensor_specs`) is composed per layer: the block's norms and MLP, plus
the mixer's own tensors from its kind's spec (`spec.hf_tensors`), relative to the layer's block
tree. Where layer l lives in the stacked params tree is asked of `model.stack`, the one place that
knows the run layout. The assembly preallocates one stacked buffer per parameter in the target
dtype, fills it tensor by tensor and hands it to JAX before the next buffer is allocated, so host
memory never holds two full copies.
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

import jax
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
from jaxllama.mixers import spec_of
from jaxllama.model import init_params, stack, unstack


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
    """One HF tensor and where it lives: in layer `layer`'s block tree (`path` relative to the
    block, as `model.unstack` gives it), or for `layer` None (embedding, final norm, LM head) in
    the params tree itself.

    HF matrices are [out, in]; ours are [in..., out...], so a matrix is transposed then reshaped
    (`transpose`); vectors and the embedding table are only reshaped. `shape` is the param of one
    layer (without the stacked axis).
    """

    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transpose: bool

    def to_param(self, a: np.ndarray) -> np.ndarray:
        return (a.T if self.transpose else a).reshape(self.shape)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(p.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(p.reshape(self.hf_shape))


def _block_tensors(cfg: ModelConfig) -> tuple[tuple, tuple]:
    """The Llama tensors every block has, (before the mixer's, after): norms, SwiGLU MLP."""
    d, f = cfg.hidden_size, cfg.intermediate_size

    def t(name, path, hf_shape, transpose):
        shape = hf_shape[::-1] if transpose else hf_shape
        return (name, path, hf_shape, shape, transpose)

    norms = (t("input_layernorm.weight", ("mixer_norm", "scale"), (d,), False),
             t("post_attention_layernorm.weight", ("mlp_norm", "scale"), (d,), False))
    mlp = tuple(t(f"mlp.{proj}.weight", ("mlp", ours, "kernel"), hf_shape, True)
                for proj, ours, hf_shape in (("gate_proj", "gate", (f, d)),
                                             ("up_proj", "up", (f, d)),
                                             ("down_proj", "down", (d, f))))
    return norms, mlp


def check_hf_layout(cfg: ModelConfig) -> None:
    """A one-line error naming the first layer whose kind has no HF tensors (`hf_tensors` None)."""
    for layer, kind in enumerate(cfg.layer_pattern):
        if spec_of(kind).hf_tensors is None:
            raise CheckpointError(f"layer {layer}: layer kind {kind!r} has no HF checkpoint "
                                  "layout")


def tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every HF tensor a Llama-layout checkpoint of `cfg` holds, keyed by HF name, in HF order.
    A layer whose kind has no HF layout (`spec.hf_tensors` None) is a one-line error."""
    d, v = cfg.hidden_size, cfg.vocab_size
    specs = {}

    def add(name, path, layer, hf_shape, shape, transpose):
        specs[name] = TensorSpec(name, tuple(path), layer, tuple(hf_shape), tuple(shape),
                                 transpose)

    add("model.embed_tokens.weight", ("embed", "embedding"), None, (v, d), (v, d), False)
    add("model.norm.weight", ("norm", "scale"), None, (d,), (d,), False)
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", ("lm_head", "kernel"), None, (v, d), (d, v), True)
    check_hf_layout(cfg)
    norms, mlp = _block_tensors(cfg)
    mixers = {}
    for layer, kind in enumerate(cfg.layer_pattern):
        spec = spec_of(kind)
        if kind not in mixers:
            mixers[kind] = tuple((t.hf_name, t.path, t.hf_shape, t.shape, t.transpose)
                                 for t in spec.hf_tensors(spec.config(cfg)))
        for name, path, hf_shape, shape, transpose in norms + mixers[kind] + mlp:
            add(f"model.layers.{layer}.{name}", path, layer, hf_shape, shape, transpose)
    return specs


def _tree_of(entries: Iterable[tuple[tuple, Any]]) -> dict:
    tree: dict = {}
    for path, value in entries:
        set_path(tree, path, value)
    return tree


def stacked_plan(cfg: ModelConfig, specs: dict[str, TensorSpec]
                 ) -> dict[tuple, list[TensorSpec]]:
    """Every param leaf of the stacked tree (its path) -> the tensors that fill it, in stacking
    order (one for a non-layer leaf). Computed by `model.stack` itself on trees whose leaves
    are indices into the table, so the run layout is never re-derived here."""
    table = list(specs.values())
    layers = [[] for _ in range(cfg.num_layers)]
    rest = []
    for i, s in enumerate(table):
        (rest if s.layer is None else layers[s.layer]).append((s.path, np.asarray(i)))
    plan = stack(cfg, [_tree_of(entries) for entries in layers], _tree_of(rest))
    out = {}
    for keys, ids in jax.tree_util.tree_leaves_with_path(plan):
        path = tuple(k.key for k in keys)
        out[path] = [table[i] for i in np.atleast_1d(ids)]
    return out


def stacked_shapes(cfg: ModelConfig, specs: dict[str, TensorSpec]) -> dict[tuple, tuple]:
    """Full shape of every param leaf (stacked leaves get the leading layer-in-run axis)."""
    return {path: group[0].shape if group[0].layer is None else (len(group),) + group[0].shape
            for path, group in stacked_plan(cfg, specs).items()}


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
                    desc: str = "loading", specs: dict[str, TensorSpec] | None = None) -> dict:
    """Read every tensor of `cfg` from `src` into a params tree of jnp arrays in `dtype`
    (`specs`: a table other than the Llama one, e.g. `mamba_hf.tensor_specs`)."""
    specs = tensor_specs(cfg) if specs is None else specs
    check_tensors(specs, src, ignore)
    np_dtype = jnp.dtype(dtype)
    params: dict = {}
    with tqdm(total=len(specs), desc=desc, unit="tensor", disable=None, leave=False) as bar:
        for path, group in stacked_plan(cfg, specs).items():
            stacked = group[0].layer is not None
            buf = np.empty(((len(group),) if stacked else ()) + group[0].shape, np_dtype)
            for j, s in enumerate(group):
                a = src.read(s.hf_name)
                if not np.issubdtype(a.dtype, np.floating) and a.dtype != jnp.bfloat16:
                    raise CheckpointError(f"{s.hf_name}: dtype {a.dtype} in {src.files[s.hf_name]} "
                                          "is not a float type")
                if stacked:
                    buf[j] = s.to_param(a)
                else:
                    buf[...] = s.to_param(a)
                bar.update(1)
            set_path(params, path, jnp.asarray(buf))
            del buf
    return params


def export_tensors(cfg: ModelConfig, params: dict, specs: dict[str, TensorSpec] | None = None
                   ) -> Iterable[tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every tensor, one at a time, in HF order. Every
    shape is checked before the first tensor is yielded; layer tensors are read from the
    per-layer view (`model.unstack`) of the params moved to host once. `specs` as in
    `assemble_params`."""
    specs = tensor_specs(cfg) if specs is None else specs
    for path, shape in stacked_shapes(cfg, specs).items():
        got = tuple(get_path(params, path).shape)
        if got != shape:
            raise CheckpointError(f"params/{'/'.join(path)}: shape {list(got)}, "
                                  f"expected {list(shape)}")
    host = jax.tree.map(np.asarray, params)
    layers = unstack(cfg, host)  # numpy views, no copies
    for name, s in specs.items():
        yield name, s.to_hf(get_path(host if s.layer is None else layers[s.layer], s.path))


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


def _layer_keys(cfg: ModelConfig) -> set[str]:
    """The top-level params keys `model.stack` puts the layers under."""
    return set(stack(cfg, [{}] * cfg.num_layers, {}))


def _shapes(tree) -> dict[tuple, tuple]:
    return {tuple(k.key for k in keys): tuple(x.shape)
            for keys, x in jax.tree_util.tree_leaves_with_path(tree)}


def relayout(params: dict, old: ModelConfig, new: ModelConfig) -> dict:
    """Regroup stacked layer weights when overrides change `cfg.runs` (e.g. dense*2,lambda*28):
    layer l of `old` becomes layer l of `new`, through the per-layer view (`unstack` / `stack`).
    Each layer's tree must keep its structure and shapes (any kind, HF layout or not)."""
    want = jax.eval_shape(lambda: unstack(new, init_params(new, jax.random.key(0))))
    have = jax.eval_shape(lambda p: unstack(old, p), params)
    for layer, (w, h) in enumerate(zip(want, have, strict=True)):
        w, h = _shapes(w), _shapes(h)
        if set(w) != set(h):
            raise CheckpointError(f"overrides: change the parameters of layer {layer}; only the "
                                  "layer pattern and shape-preserving fields may be overridden")
        for path, shape in h.items():
            if shape != w[path]:
                raise CheckpointError(f"overrides: layer {layer} {'/'.join(path)} would change "
                                      f"shape {list(shape)} -> {list(w[path])}")
    if [n for _, n in old.runs] == [n for _, n in new.runs]:
        return params  # the same stacking: nothing moves
    layer_keys = _layer_keys(old)
    rest = {k: v for k, v in params.items() if k not in layer_keys}
    return stack(new, unstack(old, params), rest)


def _default_permissions(root: Path) -> None:
    """mkdtemp (and some writers) create owner-only entries; give the finished tree the permissions
    a plain mkdir/open would (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
