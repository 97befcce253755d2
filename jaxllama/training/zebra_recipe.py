"""Zebra-Llama recipes: a `hybridize` stage kind for `training/recipe.py`.

A recipe whose first stage has `kind: hybridize` turns its teacher into an MLA + Mamba2 hybrid
(`jaxllama.hybridize`, the same settings as `convert hybridize`'s flags, written in snake case)
and writes it to `<output_dir>/<name>/final/` as a jaxllama orbax directory; the following
(training) stages start from the previous stage's `final/` as every recipe stage does, so
Zebra-Llama's pipeline is

    base:
      model: {max_position_embeddings: 8192}   # the hybrid's context (stages never shrink it)
      distill: {teacher: embedded}              # the same checkpoint as hybridize.input
      ...
    stages:
      - {name: hybridize, kind: hybridize,
         hybridize: {input: embedded, mla_layers: [0, 3], q_lora_rank: 384, kv_lora_rank: 128}}
      - {name: ild, seq_len: 256, steps: 100, lr: 1.0e-3, overrides: [distill.stage=layerwise]}
      - {name: kl, seq_len: 256, steps: 100, lr: 3.0e-4,
         overrides: [distill.stage=kl, distill.ce_weight=0.1]}

Stage 1 (layer-wise ILD) and stage 2 (KL, optional CE) are ordinary train stages with a `distill`
section (`training/distill.py`). A finished stage (its `final/` exists) is skipped on a rerun,
the hybridize stage included; a training stage cut short resumes from its checkpoints. The
hybridize stage writes atomically, so an interrupted one leaves no `final/` and reruns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxllama.config import ConfigError, from_dict, migrate_model_dict, to_dict

log = logging.getLogger(__name__)
KIND = "hybridize"


@dataclass(frozen=True)
class HybridizeSettings:
    """A hybridize stage's `hybridize:` mapping: `convert hybridize`'s flags in snake case (the
    CLI's help says what each does). Only the keys given are passed on, so a `preset`'s values
    stay unless overridden; `q_lora_rank: null` is a plain q_proj."""

    input: str = "embedded"  # the teacher: any checkpoint load_checkpoint reads
    preset: str | None = None  # a layout of configs/zebra/layouts.yaml (or a YAML file)
    mla_layers: tuple[int, ...] = ()
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_factor: float | None = None
    original_max_position_embeddings: int | None = None
    lora_layer_norm: bool = False
    full_kv_head: bool = False
    bf16_round: bool = True
    seed: int = 0
    dtype: str = "float32"


def settings(stage) -> HybridizeSettings:
    """The validated settings of a hybridize stage (one-line ConfigError naming the key)."""
    where = f"stages[{stage.name}].hybridize"
    s = from_dict(HybridizeSettings, dict(stage.hybridize), where)
    if (s.preset is None) == (not s.mla_layers):
        raise ConfigError(f"{where}: give exactly one of mla_layers and preset")
    if s.preset is None and "kv_lora_rank" not in stage.hybridize:
        raise ConfigError(f"{where}.kv_lora_rank: required with mla_layers")
    if s.preset is None and "q_lora_rank" not in stage.hybridize:
        raise ConfigError(f"{where}.q_lora_rank: required with mla_layers (a number, or null)")
    return s


def hybridize_argv(stage, output: str | Path) -> list[str]:
    """`convert hybridize` arguments of a stage, writing orbax to `output`."""
    s = settings(stage)
    argv = ["--output", str(output), "--to", "orbax"]
    for key in stage.hybridize:
        value = getattr(s, key)
        flag = "--" + key.replace("_", "-")
        if key == "input":
            argv += [] if value == "embedded" else ["--input", value]
        elif key == "mla_layers":
            argv += [flag, ",".join(str(i) for i in value)]
        elif key in ("lora_layer_norm", "full_kv_head"):
            argv += [flag] if value else []
        elif key == "bf16_round":
            argv += [flag, "on" if value else "off"]
        elif key == "q_lora_rank" and value is None:
            argv += [flag, "none"]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _parse(stage, output):
    """argparse namespace of the stage (flag errors become one-line ConfigErrors)."""
    from jaxllama.hybridize import parse_args
    argv = hybridize_argv(stage, output)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_args(argv), argv
    except SystemExit:
        msg = err.getvalue().strip().splitlines()[-1:] or ["bad settings"]
        raise ConfigError(f"stages[{stage.name}].hybridize: {msg[0].split('error: ')[-1]}"
                          ) from None


def check_stage(stage) -> None:
    """StageConfig validation of a hybridize stage: it trains nothing."""
    for key in ("seq_len", "steps", "batch_size"):
        if getattr(stage, key):
            raise ConfigError(f"stages[{stage.name}].{key}: a hybridize stage trains nothing "
                              "(leave it out)")
    if stage.overrides or stage.rope or stage.rope_theta is not None or stage.mesh:
        raise ConfigError(f"stages[{stage.name}]: a hybridize stage takes only `hybridize` "
                          "settings")
    _parse(stage, "final")


def stage_config(recipe, i: int):
    """The train config shown for a hybridize stage: the base, with this stage's output paths
    (the hybrid goes to `final/`); its `model` holds the context later stages keep."""
    from jaxllama.training.recipe import stage_dir
    base = recipe.base
    out = stage_dir(recipe, i)
    model = migrate_model_dict(dict(base.model))
    model["max_position_embeddings"] = model.get("max_position_embeddings", 0)
    ckpt = dataclasses.replace(base.checkpoint, dir=None, export_orbax=str(out / "final"))
    return base.replace(model=model, checkpoint=ckpt,
                        log=dataclasses.replace(base.log, dir=str(out)),
                        source=f"{recipe.source} stage {recipe.stages[i].name}")


def run_stage(recipe, i: int) -> dict[str, Any]:
    """Hybridize the teacher into `<stage>/final/` (orbax, written atomically)."""
    from jaxllama import hybridize
    from jaxllama.training.recipe import stage_dir
    st = recipe.stages[i]
    final = stage_dir(recipe, i) / "final"
    final.parent.mkdir(parents=True, exist_ok=True)
    args, argv = _parse(st, final)
    log.info("stage %s: hybridizing %s into %s", st.name, settings(st).input, final)
    hybridize.run(args, argv)
    return {"step": 0, "loss": None, "stopped": None, "complete": False}


def hybrid_model(recipe, i: int) -> dict:
    """The model mapping of the hybrid that hybridize stage i makes, for `validate_recipe`
    (the teacher is loaded for its config; nothing is converted or written)."""
    from jaxllama.checkpoint import load_checkpoint
    from jaxllama.checkpoint.hf_config import config_to_hf
    from jaxllama.checkpoint.zebra_model import model_config
    from jaxllama.hybridize import layout_for, plan_from_args
    st = recipe.stages[i]
    args, argv = _parse(st, "final")
    s = settings(st)
    teacher = load_checkpoint(None if s.input == "embedded" else s.input, "float32").config
    layout = layout_for(teacher, plan_from_args(args, teacher, argv),
                        config_to_hf(teacher, {}, "float32"))
    return to_dict(model_config(layout))


__all__ = ["KIND", "HybridizeSettings", "check_stage", "hybrid_model", "hybridize_argv",
           "run_stage", "settings", "stage_config"]
