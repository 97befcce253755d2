"""Progressive context extension: a recipe runs training stages, each from the previous stage's
weights, changing the sequence length and the RoPE base (or scaling) between stages.

This is the structure of Gradient's Llama-3-8B-Instruct-1048k schedule (METHODS section 3): only
`rope_theta` and the sequence length change (65K -> 262K -> 524K -> 1048K tokens, thetas tuned
empirically), the learning rate stays 2e-5, ring attention spans the sequence. A recipe YAML:

    devices: 64                # device count to validate for (0 = this host's devices)
    output_dir: runs/my-recipe
    base: configs/train/x.yaml # or an inline train mapping
    stages:
      - {name: 65k, seq_len: 65536, rope_theta: 15296098, steps: 30, lr: 2.0e-5, batch_size: 32}
      - ...

Stage k trains with `base` plus its own settings and writes `output_dir/<name>/` (checkpoints,
metrics, and `final/`, a jaxllama orbax export); stage k+1 initialises from stage k's `final/`.
A finished stage (its `final/` exists) is skipped, so rerunning a recipe resumes it, and rerunning
a finished recipe trains nothing (`complete` in the result).
A stage of `kind: hybridize` (Zebra-Llama, `training/zebra_recipe.py`) trains nothing: it turns
a teacher into an MLA + Mamba2 hybrid in its `final/`, which the next stage starts from.
`validate_recipe` checks every stage with `jax.eval_shape` on an abstract mesh of `devices`
devices: shapes, shardings and the whole train step are traced, nothing is allocated or run.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllama.checkpoint.hub import parse_hub_id
from jaxllama.config import ConfigError, apply_overrides, from_dict, load_yaml, migrate_model_dict
from jaxllama.training.config import (
    TrainConfig,
    check_against_devices,
    resolve_model_config,
    train_config_from_dict,
)

STAGE_KINDS = ("train", "hybridize")


@dataclass(frozen=True)
class StageConfig:
    name: str = ""
    # train, or hybridize: turn the teacher into a Zebra-Llama hybrid (training/zebra_recipe.py)
    kind: str = "train"
    hybridize: dict = field(default_factory=dict)  # a hybridize stage's settings
    seq_len: int = 0
    steps: int = 0
    lr: float = 0.0
    rope_theta: float | None = None  # new RoPE base
    rope: dict = field(default_factory=dict)  # or other rope fields (type, factor, ...)
    batch_size: int = 0  # 0 = the base's
    mesh: dict = field(default_factory=dict)  # mesh axes overriding the base's
    overrides: tuple[str, ...] = ()  # any other dotted overrides of the train config

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ConfigError(f"kind: {self.kind!r} is not one of {STAGE_KINDS} in stage "
                              f"{self.name or '?'}")
        if self.kind == "hybridize":
            if not self.name:
                raise ConfigError("name: every stage needs a name")
            from jaxllama.training import zebra_recipe
            return zebra_recipe.check_stage(self)
        if self.hybridize:
            raise ConfigError(f"hybridize: only a stage of kind hybridize takes it (stage "
                              f"{self.name or '?'})")
        for key in ("seq_len", "steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0 in stage {self.name or '?'}")
        if not self.name:
            raise ConfigError("name: every stage needs a name")


@dataclass(frozen=True)
class RecipeConfig:
    base: TrainConfig
    stages: tuple[StageConfig, ...]
    output_dir: str = "runs/recipe"
    devices: int = 0
    source: str = ""


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    """A recipe YAML (base given inline or as a train YAML path) plus dotted overrides."""
    data = load_yaml(path)
    try:
        if isinstance(data.get("base"), str):
            data["base"] = load_yaml(data["base"])
        data = apply_overrides(data, list(overrides))
        known = {"base", "stages", "output_dir", "devices"}
        for key in data:
            if key not in known:
                raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known))})")
        if not isinstance(data.get("stages"), list) or not data["stages"]:
            raise ConfigError("stages: a non-empty list of stages is needed")
        stages = tuple(from_dict(StageConfig, s, f"stages[{i}]")
                       for i, s in enumerate(data["stages"]))
        if len({s.name for s in stages}) != len(stages):
            raise ConfigError("stages: stage names must be unique")
        base = train_config_from_dict(data.get("base") or {})
        devices = data.get("devices", 0)
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 0:
            raise ConfigError(f"devices: expected a count >= 0, got {devices!r}")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return RecipeConfig(base.replace(source=str(path)), stages,
                        str(data.get("output_dir", "runs/recipe")), devices, str(path))


def stage_dir(recipe: RecipeConfig, i: int) -> Path:
    return Path(recipe.output_dir) / recipe.stages[i].name


def stage_config(recipe: RecipeConfig, i: int) -> TrainConfig:
    """The train config of stage i: base + stage settings; stage i > 0 starts from stage i-1."""
    st, base = recipe.stages[i], recipe.base
    if st.kind == "hybridize":
        from jaxllama.training import zebra_recipe
        return zebra_recipe.stage_config(recipe, i)
    rope = dict(st.rope)
    if st.rope_theta is not None:
        rope["theta"] = st.rope_theta
    attention: dict[str, Any] = {"rope": rope} if rope else {}
    if i == 0:
        model = copy.deepcopy(base.model)
        init = base.init
    else:  # the previous stage's export carries the whole model config
        model = {"kernels": copy.deepcopy(base.model.get("kernels", {}))}
        init = dataclasses.replace(base.init, checkpoint=str(stage_dir(recipe, i - 1) / "final"))
    model = migrate_model_dict(model)
    if rope or "attention" in model:  # no empty rope: it would reset a loaded model's RoPE
        merged_attention = {**model.get("attention", {}), **attention}
        merged_attention["rope"] = {**model.get("attention", {}).get("rope", {}), **rope}
        model["attention"] = merged_attention
    # the context the model has been trained for so far (never shrinks from stage to stage)
    max_pos = migrate_model_dict(base.model).get("max_position_embeddings", 0)
    model["max_position_embeddings"] = max([max_pos] + [s.seq_len for s in recipe.stages[: i + 1]])
    train = dataclasses.replace(base.train, seq_len=st.seq_len, steps=st.steps,
                                lr=st.lr or base.train.lr,
                                batch_size=st.batch_size or base.train.batch_size)
    out = stage_dir(recipe, i)
    ckpt = dataclasses.replace(base.checkpoint, dir=str(out / "checkpoints"),
                               export_orbax=str(out / "final"))
    mesh = from_dict(type(base.mesh), {**dataclasses.asdict(base.mesh), **st.mesh}, "mesh")
    cfg = base.replace(model=model, init=init, train=train, checkpoint=ckpt, mesh=mesh,
                       log=dataclasses.replace(base.log, dir=str(out)))
    if st.overrides:
        from jaxllama.config import to_dict

        data = apply_overrides(to_dict(cfg), list(st.overrides))
        cfg = train_config_from_dict(data, recipe.source)
    return cfg.replace(source=f"{recipe.source} stage {st.name}")


def run_recipe(recipe: RecipeConfig) -> dict[str, Any]:
    """Run the stages in order, skipping finished ones. Stops early when a stage is stopped."""
    from jaxllama.training.trainer import run

    results = []
    out: dict[str, Any] = {"step": 0, "loss": None, "stopped": None}
    for i, st in enumerate(recipe.stages):
        if (stage_dir(recipe, i) / "final").is_dir():
            results.append({"stage": st.name, "skipped": True})
            continue
        if st.kind == "hybridize":
            from jaxllama.training import zebra_recipe
            out = zebra_recipe.run_stage(recipe, i)
        else:
            out = run(stage_config(recipe, i))
        results.append({"stage": st.name, "step": out["step"], "loss": out["loss"],
                        "complete": bool(out.get("complete"))})
        if out["stopped"]:
            break
    # complete: nothing left to train (every stage finished before this call)
    complete = all(r.get("skipped") or r.get("complete") for r in results)
    return {**out, "stages": results, "complete": complete, "output_dir": recipe.output_dir}


def _bytes_per_device(tree) -> float:
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shards = 1
        spec = leaf.sharding.spec
        mesh = leaf.sharding.mesh
        for axes in spec:
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                shards *= mesh.shape[a]
        total += leaf.size * leaf.dtype.itemsize / shards
    return total


def validate_train_config(cfg: TrainConfig, devices: int = 0, name: str = "") -> str:
    """Trace one train step of `cfg` with `jax.eval_shape` on an abstract mesh; one summary line.

    Without a checkpoint on disk the model comes from `model_preset` / `model` (a recipe's HF
    init path need not exist to be validated)."""
    from jaxllama.model import Transformer
    from jaxllama.sharding import make_abstract_mesh, use_mesh
    from jaxllama.training.optimizer import lr_schedule, make_optimizer
    from jaxllama.training.step import BATCH_KEYS, state_shardings, train_step
    from jaxllama.training.trainer import init_state_shapes

    devices = devices or jax.device_count()
    ckpt = cfg.init.checkpoint
    if ckpt and not cfg.model_preset and (ckpt == "embedded" or Path(ckpt).exists()
                                          or parse_hub_id(ckpt)):
        from jaxllama.training.trainer import load_model

        model_cfg = load_model(cfg).config  # the checkpoint's config plus the `model` overrides
    else:
        model_cfg = resolve_model_config(cfg)
    sizes = check_against_devices(cfg, devices, 1, model_cfg.kernels.context_parallel)
    model = Transformer(model_cfg)
    t = cfg.train
    tx = make_optimizer(lr_schedule(t.lr, t.steps, t.warmup_steps, t.schedule, t.min_lr_ratio),
                        weight_decay=t.weight_decay, clip_norm=t.clip_norm or None)
    mesh = make_abstract_mesh(cfg.mesh, devices)
    shapes = jax.eval_shape(lambda: init_state_shapes(model, tx))
    sh = state_shardings(model, tx, mesh)
    state = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d),
                         shapes, sh)
    batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len),
                                     jnp.float32 if k == "weights" else jnp.int32)
             for k in BATCH_KEYS}
    with use_mesh(mesh):
        new_state, metrics = jax.eval_shape(
            lambda s, b: train_step(s, b, model=model, tx=tx, loss_chunk=t.loss_chunk,
                                    grad_accum=t.grad_accum), state, batch)
    if jax.tree.structure(new_state) != jax.tree.structure(state) or metrics["loss"].shape:
        raise ConfigError(f"{cfg.source}: the train step changes the state structure")
    n_params = sum(x.size for x in jax.tree.leaves(shapes.params))
    gib = _bytes_per_device(state) / 2 ** 30
    tokens = t.steps * t.batch_size * t.seq_len
    return (f"{name or cfg.source}: seq {t.seq_len}, theta {model_cfg.attention.rope.theta:.0f}, "
            f"{t.steps} steps x {t.batch_size} seqs = {_count(tokens)} tokens, lr {t.lr:g}, "
            f"mesh {sizes}, {_count(n_params, 2)} params, state {gib:.3g} GiB/device: ok")


def _count(n: float, digits: int = 1) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{digits}f}{unit}"
    return str(int(n))


def validate_recipe(recipe: RecipeConfig) -> list[str]:
    """`validate_train_config` of every stage (stage > 0 uses the base model + stage changes)."""
    from jaxllama.training import zebra_recipe

    lines = []
    hybrid = None  # the model mapping a hybridize stage makes, for the stages after it
    for i, st in enumerate(recipe.stages):
        cfg = stage_config(recipe, i)
        if st.kind == "hybridize":
            hybrid = zebra_recipe.hybrid_model(recipe, i)
            lines.append(f"stage {st.name}: hybridize to {len(hybrid['layer_pattern'])} layers "
                         f"({', '.join(sorted(set(hybrid['layer_pattern'])))}): ok")
            continue
        if hybrid is not None:  # that hybrid, with this stage's model settings
            model = {**hybrid, **{k: v for k, v in cfg.model.items() if k != "attention"}}
            cfg = cfg.replace(model=model)
        elif i > 0:  # its checkpoint does not exist yet: same model as the base, this stage's rope
            model = migrate_model_dict(copy.deepcopy(recipe.base.model))
            stage_rope = cfg.model.get("attention", {}).get("rope", {})
            model["attention"] = {**model.get("attention", {}), **cfg.model.get("attention", {}),
                                  "rope": {**model.get("attention", {}).get("rope", {}),
                                           **stage_rope}}
            model["max_position_embeddings"] = cfg.model["max_position_embeddings"]
            cfg = cfg.replace(model=model)
        lines.append(validate_train_config(cfg, recipe.devices, f"stage {st.name}"))
    return lines
