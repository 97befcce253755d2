"""jaxllama's own checkpoint directory: orbax params, the model config as YAML, tokenizer files.

Layout: `model.yaml` (top-level `model:`, loadable by `jaxllama.config.load_model_config`),
`params/` (an orbax `StandardCheckpointer` tree), `generation_config.json`, tokenizer files.
`params/` holds the model's own parameter tree (`jaxllama.model.Transformer`, stacked runs at
`run_{r}/block/...`) as it is: no HF tensor names on this path, so a model of any registered layer
kind round-trips. Restoring first checks the stored tree against `jax.eval_shape(init_params)` of
the stored config (one-line error naming the first differing path), then asks orbax for the
target dtype directly, so no second full-precision copy is made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from jaxllama.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    atomic_output_dir,
    quiet,
    with_dtype,
    with_overrides,
)
from jaxllama.checkpoint.hf import load_tokenizer, read_json
from jaxllama.config import ConfigError, ModelConfig, load_model_config, to_dict

MODEL_YAML = "model.yaml"
PARAMS_DIR = "params"
GENERATION = "generation_config.json"


def is_orbax_dir(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_YAML).is_file() and (path / PARAMS_DIR).is_dir()


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def _abstract_params(cfg: ModelConfig, dtype: str) -> dict:
    """ShapeDtypeStructs of every param leaf of `Transformer(cfg)` (the restore target)."""
    from jaxllama.model import init_params
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)


def _check_tree(got, want, where: str, what: str) -> None:
    """CheckpointError naming the first path whose presence or shape differs."""
    from jaxllama.model import first_mismatch
    bad = first_mismatch(got, want)
    if bad is None:
        return
    path, a, b = bad
    if a is None:
        raise CheckpointError(f"{where}: {path} missing (the config needs shape {list(b)})")
    if b is None:
        raise CheckpointError(f"{where}: {path} (shape {list(a)}) is not a parameter of {what}")
    raise CheckpointError(f"{where}: {path} has shape {list(a)}, {what} needs {list(b)}")


def save_orbax(config: ModelConfig, params: dict, tokenizer, out_dir: str | os.PathLike,
               generation_config: dict | None = None, *, overwrite: bool = False) -> str:
    """Write an orbax checkpoint directory (atomically: temporary sibling, renamed at the end).
    `params` must be `Transformer(config)`'s tree (checked before anything is written)."""
    _check_tree(params, _abstract_params(config, config.param_dtype), "params",
                "the model config")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        with open(tmp / MODEL_YAML, "w") as f:
            yaml.safe_dump({"model": to_dict(config)}, f, sort_keys=False)
        with quiet("absl"):
            ckpt = _checkpointer()
            # orbax refuses relative paths
            ckpt.save((tmp / PARAMS_DIR).absolute(), jax.tree.map(jnp.asarray, params))
            ckpt.wait_until_finished()
            ckpt.close()
        with open(tmp / GENERATION, "w") as f:
            json.dump(generation_config or {}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return str(Path(out_dir).absolute())


def _stored_tree(ckpt, params_dir: Path):
    """The stored params tree's array metadata (each leaf has `.shape`), read without the data."""
    try:
        with quiet("absl"):
            meta = ckpt.metadata(params_dir)
        return meta.item_metadata.tree
    except Exception as e:  # noqa: BLE001 - any reader error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{params_dir}: cannot read the params metadata ({msg})") from None


def load_orbax(path: str | os.PathLike, dtype: str = "float32", overrides=()) -> Checkpoint:
    from jaxllama.model import relayout_params

    path = Path(path).absolute()  # orbax refuses relative paths
    try:
        cfg = load_model_config(path / MODEL_YAML)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    stored = cfg
    cfg = with_dtype(with_overrides(cfg, overrides), dtype)
    target = _abstract_params(stored, dtype)
    ckpt = _checkpointer()
    try:
        _check_tree(_stored_tree(ckpt, path / PARAMS_DIR), target, str(path / PARAMS_DIR),
                    f"the model in {MODEL_YAML}")
        try:
            with quiet("absl"):
                params = ckpt.restore(path / PARAMS_DIR, target)
        except Exception as e:  # noqa: BLE001 - any reader error
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore params ({msg})") from None
    finally:
        ckpt.close()
    try:
        params = relayout_params(params, stored, cfg)
    except ValueError as e:
        raise CheckpointError(f"overrides: {e}") from None
    gen = read_json(path / GENERATION) if (path / GENERATION).is_file() else {}
    return Checkpoint(cfg, params, load_tokenizer(path), gen, str(path))
