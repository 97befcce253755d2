"""HF Llama directories in and out: config.json, (sharded) safetensors, generation_config.json,
tokenizer files.

Loading streams one tensor at a time through `safetensors.safe_open` (memory-mapped) into the
stacked buffers of `base.assemble_params`, so an 8B checkpoint never needs two full copies in host
memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jaxllama.checkpoint import mamba_hf
from jaxllama.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    TensorSource,
    assemble_params,
    atomic_output_dir,
    export_tensors,
    quiet,
    tensor_specs,
    with_dtype,
    with_overrides,
)
from jaxllama.checkpoint.hf_config import (
    config_from_hf,
    config_to_hf,
    generation_from_hf,
    generation_to_hf,
)
from jaxllama.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _tensor_files(path: Path) -> tuple[dict[str, Path], str]:
    """{tensor name: shard file} and what to name when a tensor is missing."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / INDEX}: no `weight_map` object")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {path / INDEX} does not exist")
        return files, str(path / INDEX)
    if not (path / SINGLE).is_file():
        raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} (only safetensors weights are read)")
    with _open(path / SINGLE) as f:
        names = list(f.keys())
    return {name: path / SINGLE for name in names}, str(path / SINGLE)


def _open(file: Path):
    try:
        return safe_open(str(file), framework="np")
    except Exception as e:  # noqa: BLE001 - any reader error
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_tokenizer(path: Path):
    """The transformers fast tokenizer in `path` (None when the directory has none)."""
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    try:
        with quiet("transformers"):
            return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any reader error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot load the tokenizer ({msg})") from None


def load_hf(path: str | os.PathLike, dtype: str = "float32", overrides=()) -> Checkpoint:
    """Load an HF Llama (or Mamba, Mamba2: `mamba_hf`) directory into a `Checkpoint`."""
    path = Path(path)
    raw = read_json(path / "config.json")
    from_hf = mamba_hf.config_from_hf if mamba_hf.is_mamba_config(raw) else config_from_hf
    cfg = from_hf(raw, str(path / "config.json"))
    cfg = with_dtype(with_overrides(cfg, overrides), dtype)
    specs = mamba_hf.tensor_specs(cfg) if mamba_hf.is_mamba_config(raw) else None
    files, missing_where = _tensor_files(path)
    ignore = ["lm_head.weight"] if cfg.tie_word_embeddings else []
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(name):
            file = files[name]
            if file not in handles:
                handles[file] = stack.enter_context(_open(file))
            return handles[file]

        def shape(name):
            try:
                return tuple(handle(name).get_slice(name).get_shape())
            except CheckpointError:
                raise
            except Exception:  # noqa: BLE001 - any reader error
                raise CheckpointError(f"{name}: listed for {files[name]} but not in it") from None

        def read(name):
            return handle(name).get_tensor(name)

        src = TensorSource({k: str(v) for k, v in files.items()}, shape, read, missing_where)
        params = assemble_params(cfg, src, dtype, ignore=ignore, desc=f"loading {path.name}",
                                 specs=specs)
    tokenizer = load_tokenizer(path)
    gen_file = path / "generation_config.json"
    gen = read_json(gen_file) if gen_file.is_file() else {}
    return Checkpoint(cfg, params, tokenizer, generation_from_hf(gen, raw, tokenizer), str(path))


# ----------------------------------------------------------------------------- export


def _dtype_name(params: dict) -> str:
    return str(jnp.asarray(params["embed"]["embedding"]).dtype)


def _write_shards(cfg: ModelConfig, params: dict, out: Path, max_shard_bytes: int,
                  specs=None) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + an index past `max_shard_bytes`."""
    tensors = export_tensors(cfg, params, specs)
    bar = tqdm(tensors, total=len(specs or tensor_specs(cfg)), desc="writing", unit="tensor", disable=None,
               leave=False)
    write_safetensors(bar, out, max_shard_bytes)


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], out: Path,
                      max_shard_bytes: int) -> None:
    """(name, array) pairs into `out` as model.safetensors, or as model-0000i-of-0000n.safetensors
    shards plus model.safetensors.index.json once they pass `max_shard_bytes` (HF's layout)."""
    shards: list[list[str]] = []
    total = 0
    current: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        nonlocal current, size
        if current:
            save_file(current, str(out / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    for name, a in tensors:
        if current and size + a.nbytes > max_shard_bytes:
            flush()
        current[name] = a
        size += a.nbytes
        total += a.nbytes
    flush()
    if len(shards) == 1:
        os.rename(out / "shard-00000.tmp", out / SINGLE)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(out / f"shard-{i:05d}.tmp", out / final)
        weight_map.update({n: final for n in names})
    with open(out / INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf(config: ModelConfig, params: dict, tokenizer, out_dir: str | os.PathLike,
            generation_config: dict | None = None, *, overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Write an HF Llama (or, for an HF-Mamba-layout model, Mamba / Mamba2) directory that
    `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Tensors keep the dtype of `params`. Everything is written into a temporary sibling directory and
    renamed into place at the end. Returns the output path.
    """
    ssm = mamba_hf.model_type_of(config) is not None  # an HF Mamba / Mamba2 model
    to_hf = mamba_hf.config_to_hf if ssm else config_to_hf
    hf_config = to_hf(config, generation_config, _dtype_name(params))
    specs = mamba_hf.tensor_specs(config) if ssm else None
    with atomic_output_dir(out_dir, overwrite) as tmp:
        _write_shards(config, params, tmp, max_shard_bytes, specs)
        with open(tmp / "config.json", "w") as f:
            json.dump(hf_config, f, indent=2)
        if generation_config:
            with open(tmp / "generation_config.json", "w") as f:
                json.dump(generation_to_hf(generation_config), f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return str(Path(out_dir).absolute())
