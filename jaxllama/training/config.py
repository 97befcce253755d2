"""`TrainConfig`: everything a training run needs besides the model, read from YAML.

A train YAML (`configs/train/*.yaml`) has the top-level sections below; dotted CLI overrides
(`train.lr=3e-4 mesh.seq=4 model.kernels.remat=full`) are applied before validation. Every check
runs before anything is loaded or compiled, and a failure is one line naming the file and key:
unknown keys, wrong types, a mesh that does not divide the device count, a batch the data axes do
not divide, a sequence length the `seq` axis (x2 for the zigzag ring layout) does not divide.

The model comes from `init.checkpoint` (HF directory, .gguf, orbax directory, a Hub model id
`org/name[@revision]`, or `embedded` for the bundled SmolLM2), else from `model_preset` (a
`configs/models` YAML), else from `model` alone; the `model` mapping always applies on top (as
overrides when a checkpoint or preset is the base).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxllama.config import (
    DTYPES,
    ConfigError,
    KernelConfig,
    ModelConfig,
    _coerce,
    apply_overrides,
    from_dict,
    load_yaml,
    migrate_model_dict,
)
from jaxllama.sharding import MeshConfig

SCHEDULES = ("cosine", "linear", "constant")
FORMATS = ("auto", "text", "jsonl", "parquet", "passkey")
PACKINGS = ("plain", "doc_aware")  # doc_aware: FoT cross-batch groups (training/data.py)


@dataclass(frozen=True)
class InitConfig:
    checkpoint: str | None = None  # None = random init; "embedded" = bundled SmolLM2; or a Hub id
    seed: int = 0  # parameter init seed (random init only)


@dataclass(frozen=True)
class PasskeyConfig:
    """Synthetic passkey retrieval: a number hidden at a random depth of filler text; the loss
    covers only the answer tokens."""

    num_examples: int = 1000
    digits: int = 5


@dataclass(frozen=True)
class MemoryTokensConfig:
    """Insert M memory tokens after every `episode_length` tokens (LongLLaMA-style); they are
    never loss targets."""

    episode_length: int = 256
    per_episode: int = 8
    token_id: int = -1  # -1 = the tokenizer's `<|memory|>` token (must exist)


@dataclass(frozen=True)
class DataConfig:
    # local files: .txt/.md (text), .jsonl/.json, .parquet; or python:MODULE.NAME (package text)
    paths: tuple[str, ...] = ()
    format: str = "auto"  # auto | text | jsonl | parquet | passkey
    text_field: str = "text"  # JSONL / parquet column with the document
    prompt_field: str | None = None  # optional column whose tokens precede the text, no loss
    doc_separator: str | None = None  # split text files into documents on this string
    tokenizer: str = "checkpoint"  # checkpoint | bytes | path to an HF tokenizer directory
    seed: int = 0  # shuffling seed
    passkey: PasskeyConfig | None = None
    memory_tokens: MemoryTokensConfig | None = None
    packing: str = "plain"  # plain | doc_aware (k consecutive rows per document span)
    doc_aware_k: int = 0  # rows per doc_aware group (doc_aware only)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"data.format: {self.format!r} is not one of {FORMATS}")
        if self.packing not in PACKINGS:
            raise ConfigError(f"data.packing: {self.packing!r} is not one of {PACKINGS}")
        if (self.packing == "doc_aware") != (self.doc_aware_k > 0) or self.doc_aware_k < 0:
            raise ConfigError(f"data.doc_aware_k: {self.doc_aware_k} with data.packing "
                              f"{self.packing!r} (doc_aware needs k >= 1, plain needs 0)")
        if self.format != "passkey" and not self.paths:
            raise ConfigError("data.paths: at least one file is needed (or format: passkey)")


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 100
    seq_len: int = 2048
    batch_size: int = 8  # sequences per optimizer step, whole run (all processes)
    grad_accum: int = 1
    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 = no clipping
    compute_dtype: str = "bfloat16"  # parameters stay float32 (master weights)
    loss_chunk: int = 1024  # tokens per loss piece; 0 = full [B T V] logits
    # a step with a non-finite loss or gradient norm is skipped; this many in a row stop the run
    max_bad_steps: int = 5

    def __post_init__(self):
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: must be > 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"train.compute_dtype: {self.compute_dtype!r} is not one of {DTYPES}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.grad_accum: {self.grad_accum} does not divide "
                              f"train.batch_size {self.batch_size}")
        if self.loss_chunk < 0 or (self.loss_chunk and self.seq_len % min(self.loss_chunk,
                                                                          self.seq_len)):
            raise ConfigError(f"train.loss_chunk: {self.loss_chunk} does not divide "
                              f"train.seq_len {self.seq_len}")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # None = no checkpoints
    every: int = 100  # save every N steps (and at the end, and on SIGTERM/SIGINT)
    keep: int = 3  # keep the last K
    async_save: bool = True
    resume: bool = True  # continue from the latest checkpoint in `dir` when there is one
    export_hf: str | None = None  # write the final model as an HF directory here
    export_orbax: str | None = None  # ... and/or as a jaxllama orbax directory (load_checkpoint)
    # simulated preemption (tests, drills): the run sends itself `preempt_signal` right after
    # this step (0 = never)
    preempt_at_step: int = 0
    preempt_signal: str = "SIGTERM"  # SIGTERM | SIGINT

    def __post_init__(self):
        if self.preempt_signal not in ("SIGTERM", "SIGINT"):
            raise ConfigError(f"checkpoint.preempt_signal: {self.preempt_signal!r} is not one of "
                              "SIGTERM, SIGINT")


@dataclass(frozen=True)
class LogConfig:
    dir: str | None = None  # metrics.jsonl and TensorBoard events; None = checkpoint.dir
    every: int = 1
    progress: bool = True  # tqdm bar with loss, lr, tokens/s, MFU
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per device, for MFU; 0 = known table or a measured CPU matmul


@dataclass(frozen=True)
class DistributedConfig:
    """`jax.distributed.initialize` arguments (multi-process runs); CPU uses gloo collectives."""

    coordinator: str | None = None  # host:port; None = single process
    num_processes: int = 1
    process_id: int = 0


DISTILL_STAGES = ("layerwise", "kl")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from a teacher (`training/distill.py`): stage `layerwise` (each student
    layer fed the teacher's layer input, L2 to its output) or `kl` (KL(teacher || student) times
    `kl_weight` plus `ce_weight` times the next-token CE). The teacher is any checkpoint
    `init.checkpoint` accepts; it runs without gradients on the student's mesh."""

    teacher: str = ""
    stage: str = "kl"
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    last_normed: bool = True  # layerwise: compare the last layer after the final norms

    def __post_init__(self):
        if not self.teacher:
            raise ConfigError("distill.teacher: a teacher checkpoint is required")
        if self.stage not in DISTILL_STAGES:
            raise ConfigError(f"distill.stage: {self.stage!r} is not one of {DISTILL_STAGES}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise ConfigError("distill.kl_weight: kl_weight and ce_weight must be >= 0 and not "
                              "both 0")


@dataclass(frozen=True)
class TrainConfig:
    model_preset: str | None = None
    model: dict = field(default_factory=dict)
    init: InitConfig = field(default_factory=InitConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(format="passkey"))
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    distill: DistillConfig | None = None  # None = plain next-token training
    cpu_devices: int = 0  # simulate this many CPU devices (CI); 0 = the platform's devices
    source: str = ""  # the YAML file (for messages); set by `load_train_config`

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)


def check_model_keys(data: Any, cls: type = ModelConfig, where: str = "model") -> None:
    """Unknown keys and wrong types in a (partial) model mapping, without building the model."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    if cls is ModelConfig:
        data = migrate_model_dict(data, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name.rstrip("_"): f for f in dataclasses.fields(cls)}
    extra = {"num_layers"} if cls is ModelConfig else set()
    for key, value in data.items():
        if key in extra or (cls is ModelConfig and key == "layer_pattern"):
            continue
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(fields))})")
        tp = hints[fields[key].name]
        sub = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        if sub is not None and isinstance(value, dict):
            check_model_keys(value, sub, f"{where}.{key}")
        elif sub is None:
            _coerce(tp, value, f"{where}.{key}")


def flatten_overrides(data: dict, prefix: str = "model") -> list[str]:
    """{"a": {"b": 1}} -> ["model.a.b=1"] (values as JSON, which YAML reads back); a model
    mapping's keys of earlier versions are migrated first (`migrate_model_dict`)."""
    if prefix == "model":
        data = migrate_model_dict(data)
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += flatten_overrides(value, f"{prefix}.{key}")
        else:
            out.append(f"{prefix}.{key}={json.dumps(value)}")
    return out


def train_config_from_dict(data: dict, source: str = "") -> TrainConfig:
    """Validate a train mapping (no devices consulted: see `check_against_devices`)."""
    data = dict(data)
    data.pop("source", None)
    try:
        cfg = from_dict(TrainConfig, data)
        check_model_keys(cfg.model)
        if "kernels" in cfg.model:
            from_dict(KernelConfig, cfg.model["kernels"], "model")  # value checks
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    return cfg.replace(source=source)


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A train YAML plus dotted overrides, validated (one-line ConfigError naming file and key)."""
    data = load_yaml(path)
    try:
        data = apply_overrides(data, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return train_config_from_dict(data, str(path))


def check_against_devices(cfg: TrainConfig, num_devices: int, num_processes: int = 1,
                          context_parallel: str = "none") -> dict[str, int]:
    """Resolve the mesh for `num_devices` and check the batch and sequence fit it."""
    where = cfg.source or "config"
    try:
        sizes = cfg.mesh.resolve(num_devices)
        batch_ways = sizes["data"] * sizes["fsdp"]
        t = cfg.train
        if t.batch_size % (batch_ways * t.grad_accum):
            raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by grad_accum x "
                              f"mesh.data x mesh.fsdp = {t.grad_accum * batch_ways}")
        if t.batch_size % num_processes:
            raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by the "
                              f"{num_processes} processes")
        seq = sizes["seq"]
        need = 2 * seq if (seq > 1 and context_parallel != "none") else seq
        if t.seq_len % need:
            layout = " (2 x mesh.seq: zigzag layout)" if need != seq else " (mesh.seq)"
            raise ConfigError(f"train.seq_len: {t.seq_len} is not divisible by {need}{layout}")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return sizes


def resolve_model_config(cfg: TrainConfig, base: ModelConfig | None = None) -> ModelConfig:
    """The model config of a run without a checkpoint: preset or `model`, plus training dtypes."""
    from jaxllama.config import load_model_config, model_config_from_dict, to_dict

    where = cfg.source or "config"
    try:
        if base is None and cfg.model_preset:
            base = load_model_config(cfg.model_preset)
        if base is None:
            model = model_config_from_dict(dict(cfg.model))
        else:
            merged = apply_overrides({"model": to_dict(base)}, flatten_overrides(cfg.model))
            merged = merged["model"]
            merged.pop("num_layers", None)
            model = model_config_from_dict(merged)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return with_training_dtypes(model, cfg)


def with_training_dtypes(model: ModelConfig, cfg: TrainConfig) -> ModelConfig:
    """float32 master weights, `train.compute_dtype` compute."""
    return model.replace(dtype=cfg.train.compute_dtype, param_dtype="float32")
