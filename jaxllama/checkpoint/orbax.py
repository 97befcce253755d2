"""jaxllama's own checkpoint directory: orbax params, the model config as YAML, tokenizer files.

Layout: `model.yaml` (top-level `model:`, loadable by `jaxllama.config.load_model_config`),
`params/` (an orbax `StandardCheckpointer` tree), `generation_config.json`, tokenizer files.
Restoring asks orbax for the target dtype directly, so no second full-precision copy is made.
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
    relayout,
    tensor_specs,
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


def save_orbax(config: ModelConfig, params: dict, tokenizer, out_dir: str | os.PathLike,
               generation_config: dict | None = None, *, overwrite: bool = False) -> str:
    """Write an orbax checkpoint directory (atomically: temporary sibling, renamed at the end)."""
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


def _abstract_params(cfg: ModelConfig, dtype: str) -> dict:
    """ShapeDtypeStructs of every param leaf (the restore target)."""
    from jaxllama.model import init_params
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)


def load_orbax(path: str | os.PathLike, dtype: str = "float32", overrides=()) -> Checkpoint:
    path = Path(path)
    try:
        cfg = load_model_config(path / MODEL_YAML)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    stored = cfg
    cfg = with_dtype(with_overrides(cfg, overrides), dtype)
    tensor_specs(stored)  # refuses layer kinds without a known layout early
    target = _abstract_params(stored, dtype)
    ckpt = _checkpointer()
    try:
        with quiet("absl"):
            params = ckpt.restore((path / PARAMS_DIR).absolute(), target)  # orbax: absolute only
    except Exception as e:  # noqa: BLE001 - any reader error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore params ({msg})") from None
    finally:
        ckpt.close()
    params = relayout(params, stored, cfg)
    gen = read_json(path / GENERATION) if (path / GENERATION).is_file() else {}
    return Checkpoint(cfg, params, load_tokenizer(path), gen, str(path))
