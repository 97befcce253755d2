"""`python -m jaxllama.train`: train from a YAML config, or run a progressive-extension recipe.

    python -m jaxllama.train --config configs/train/tiny.yaml [train.lr=1e-3 mesh.seq=2 ...]
    python -m jaxllama.train --recipe configs/recipes/tiny.yaml [base overrides ...]
    python -m jaxllama.train --recipe configs/recipes/llama3-8b-gradient-1048k.yaml --validate

Bad flags, configs and inputs are one line on stderr and exit status 2 (no traceback), before
anything compiles; settings are dotted overrides (`--steps 5` is refused with the hint
`train.steps=5`). SIGTERM / SIGINT finish the current step, save a checkpoint and exit (status 0
for SIGTERM, 130 for SIGINT); rerunning the same command resumes from it. A run that stops after
`train.max_bad_steps` non-finite steps in a row is one line and exit status 1. Rerunning a
finished run trains nothing: one line says so and how to continue (exit status 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from jaxllama.cli import CliParser, flag_hint


def _hint(message: str, argv: list[str]) -> str | None:
    """`--steps 5` -> `train.steps=5`: the dotted override of a setting given as a flag."""
    from jaxllama.training.config import TrainConfig

    sections = {}
    for f in dataclasses.fields(TrainConfig):
        tp = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(tp):
            sections[f.name] = [g.name for g in dataclasses.fields(tp)]
    return flag_hint(message, argv, sections)


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m jaxllama.train", description=__doc__.split("\n")[0],
                  hint=_hint)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="train YAML (configs/train/*.yaml)")
    src.add_argument("--recipe", help="progressive context-extension recipe (configs/recipes)")
    p.add_argument("--validate", action="store_true",
                   help="check configs and shapes with jax.eval_shape; train nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.lr=3e-4 mesh.seq=4")
    return p


def _setup_jax(cpu_devices: int) -> None:
    import jax

    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("jax").setLevel(logging.WARNING)
    from jaxllama.checkpoint import CheckpointError
    from jaxllama.config import ConfigError

    try:
        if args.recipe:
            from jaxllama.training.recipe import load_recipe, run_recipe, validate_recipe

            recipe = load_recipe(args.recipe, args.overrides)
            _setup_jax(recipe.base.cpu_devices)
            if args.validate:
                for line in validate_recipe(recipe):
                    print(line)
                return 0
            out = run_recipe(recipe)
        else:
            from jaxllama.training.config import load_train_config

            cfg = load_train_config(args.config, args.overrides)
            _setup_jax(cfg.cpu_devices)
            if args.validate:
                from jaxllama.training.recipe import validate_train_config

                print(validate_train_config(cfg))
                return 0
            from jaxllama.training.trainer import run

            out = run(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from jaxllama.training.trainer import DivergedError

        if not isinstance(e, DivergedError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    if out.get("stopped"):
        print(f"stopped by {out['stopped']} at step {out['step']}; checkpoint saved "
              "(rerun the same command to resume)", file=sys.stderr)
        return 130 if out["stopped"] == "SIGINT" else 0
    if out.get("complete"):
        print(_complete_line(args, out))
        return 0
    loss = "" if out.get("loss") is None else f" loss {out['loss']:.6f}"
    print(f"done: step {out['step']}{loss}")
    return 0


def _complete_line(args, out: dict) -> str:
    """A rerun that trained nothing: where the run stands and how to go on."""
    if args.recipe:
        return (f"recipe already complete: every stage has its final/ export under "
                f"{out.get('output_dir', 'output_dir')}; to train again, give a new "
                "output_dir=... (or delete it)")
    step = out["step"]
    return (f"run already complete at step {step} (train.steps={out.get('steps', step)}); to "
            f"continue, raise train.steps above {step} (e.g. train.steps={2 * step}), or start "
            "afresh with a new checkpoint.dir=...")


if __name__ == "__main__":
    sys.exit(main())
