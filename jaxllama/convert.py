"""`python -m jaxllama.convert`: checkpoints between formats.

    python -m jaxllama.convert --input Meta-Llama-3.1-8B/ --output llama31-orbax --to orbax
    python -m jaxllama.convert --input llama31-orbax --output llama31-hf --to hf --dtype bfloat16
    python -m jaxllama.convert --output smollm2-hf --to hf      # the embedded SmolLM2 GGUF

Inputs: an HF Llama directory, a .gguf file or a jaxllama orbax directory (no --input: the embedded
SmolLM2). Outputs are written to a temporary sibling and renamed into place, so a failed run leaves
nothing behind. Errors are one line on stderr and a non-zero exit (2 for a bad flag, 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jaxllama.cli import CliParser, model_overrides
from jaxllama.config import DTYPES, ConfigError


def _source_dtype(path: str | None) -> str:
    """The dtype a checkpoint is stored in ("auto"): HF config.json's dtype, orbax model.yaml's
    param_dtype, float32 for GGUF (its quantized weights have no float dtype to keep)."""
    from jaxllama.checkpoint import checkpoint_format, default_checkpoint, resolve_checkpoint
    path = resolve_checkpoint(path) if path else default_checkpoint()
    fmt = checkpoint_format(path)
    if fmt in ("hf", "zebra"):  # zebra: the teacher config.json it keeps
        try:
            raw = json.loads((Path(path) / "config.json").read_text())
        except (OSError, ValueError):
            return "float32"  # the loader reports the real problem
        name = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
        return name if name in DTYPES else "float32"
    if fmt == "orbax":
        from jaxllama.config import load_yaml
        name = load_yaml(Path(path) / "model.yaml").get("model", {}).get("param_dtype", "float32")
        return name if name in DTYPES else "float32"
    return "float32"


def parse_args(argv=None) -> argparse.Namespace:
    p = CliParser(prog="python -m jaxllama.convert", description=__doc__.split("\n")[0],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None,
                   help="HF directory, .gguf file or orbax directory (default: embedded SmolLM2)")
    p.add_argument("--output", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--to", required=True, choices=("hf", "orbax"), help="output format")
    p.add_argument("--dtype", default="auto", choices=("auto",) + DTYPES,
                   help="parameter dtype written (auto: the input's dtype; float32 for GGUF)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted model-config override, e.g. model.layer_pattern=lambda")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    from jaxllama.checkpoint import load_checkpoint, save_hf, save_orbax
    from jaxllama.checkpoint.base import CheckpointError
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise CheckpointError(f"{out}: output exists and is not an empty directory "
                              "(use --overwrite)")
    dtype = _source_dtype(args.input) if args.dtype == "auto" else args.dtype
    try:
        overrides = model_overrides(args.override)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ckpt = load_checkpoint(args.input, dtype, overrides)
    save = save_hf if args.to == "hf" else save_orbax
    return save(ckpt.config, ckpt.params, ckpt.tokenizer, out, ckpt.generation_config,
                overwrite=args.overwrite)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["hybridize"]:  # Llama -> Zebra-Llama hybrid (jaxllama/hybridize.py)
        from jaxllama.hybridize import main as hybridize_main
        return hybridize_main(argv[1:])
    args = parse_args(argv)
    from jaxllama.checkpoint.base import CheckpointError
    start = time.perf_counter()
    try:
        written = convert(args)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {args.to} checkpoint to {written} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
