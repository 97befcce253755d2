"""Model configuration: `ModelConfig`, one sub-config per layer kind, `KernelConfig`, YAML loading.

Configs are frozen dataclasses (hashable, so they can be static module attributes). User-facing
configs are YAML files loaded with `yaml.safe_load`; `from_dict` builds nested dataclasses and
rejects unknown keys and wrong types with a one-line `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

LayerKind = Literal["dense", "lambda", "memory", "mla", "mamba"]
LAYER_KINDS: tuple[str, ...] = typing.get_args(LayerKind)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
IMPLEMENTATIONS = ("auto", "xla", "pallas_interpret", "pallas_gpu", "pallas_tpu")


class ConfigError(ValueError):
    """A config value is wrong; the message is one line naming the key (and file when known)."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base `theta` plus one of the scaling types of METHODS section 2."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn, longrope; None = derived from factor
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        _check(self.type in ROPE_TYPES, "rope.type", f"{self.type!r} is not one of {ROPE_TYPES}")
        _check(self.theta > 0, "rope.theta", f"must be > 0, got {self.theta}")
        _check(0 < self.partial_rotary_factor <= 1, "rope.partial_rotary_factor",
               f"must be in (0, 1], got {self.partial_rotary_factor}")
        if self.type in ("linear", "dynamic", "yarn", "llama3"):
            _check(self.factor > 0, "rope.factor", f"must be > 0 for type {self.type}")
        if self.type == "llama3":
            _check(self.original_max_position_embeddings is not None,
                   "rope.original_max_position_embeddings", "required for type llama3")
            _check(self.high_freq_factor != self.low_freq_factor, "rope.high_freq_factor",
                   "must differ from low_freq_factor")
        if self.type == "longrope":
            _check(self.short_factor is not None and self.long_factor is not None,
                   "rope.short_factor", "longrope needs short_factor and long_factor")


@dataclass(frozen=True)
class AttentionConfig:
    """Dense GQA attention geometry (also the base geometry of lambda and memory layers)."""

    hidden_size: int = 0  # filled from ModelConfig.hidden_size when 0
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 0  # 0 = hidden_size // num_heads
    max_position_embeddings: int = 2048
    rope: RopeConfig = field(default_factory=RopeConfig)
    bias: bool = False

    def __post_init__(self):
        _check(self.num_heads > 0, "attention.num_heads", "must be > 0")
        _check(self.num_kv_heads > 0, "attention.num_kv_heads", "must be > 0")
        _check(self.num_heads % self.num_kv_heads == 0, "attention.num_kv_heads",
               f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        _check(self.head_dim >= 0 and self.head_dim % 2 == 0, "attention.head_dim",
               f"must be even, got {self.head_dim}")


@dataclass(frozen=True)
class LambdaConfig:
    """LM-Infinite lambda attention (METHODS section 5): G sink tokens, window L, ceiling D."""

    global_tokens: int = 100  # G
    window: int = 4096  # L
    distance: int | None = None  # D; None = window

    def __post_init__(self):
        _check(self.global_tokens >= 0, "lambda.global_tokens", "must be >= 0")
        _check(self.window > 0, "lambda.window", "must be > 0")
        _check(self.distance is None or self.distance >= 0, "lambda.distance", "must be >= 0")

    @property
    def limit_distance(self) -> int:
        """D: far sink keys are scored as if at this distance."""
        return self.window if self.distance is None else self.distance

    @classmethod
    def for_context(cls, n: int) -> LambdaConfig:
        """LM-Infinite's recipe for a model pretrained on n tokens: window L = ceiling D = n and
        100 sink tokens (its Llama-2 setting: local 4096, global 100, limit 4096; G from 10 to
        100 behaves alike), G capped at n for tiny contexts. The default of a lambda layer
        pattern given without a `lambda` section."""
        _check(n > 0, "lambda", f"no default window for a trained context of {n} tokens: add "
               "model.lambda.window=N")
        return cls(global_tokens=min(100, n), window=n, distance=n)


@dataclass(frozen=True)
class LambdaAttentionConfig(AttentionConfig):
    """What a lambda layer sees: the dense attention geometry plus its `LambdaConfig`."""

    lambda_: LambdaConfig = field(default_factory=LambdaConfig)


@dataclass(frozen=True)
class KernelConfig:
    """Which implementation runs each op, and how the layer loop is compiled."""

    attention: str = "xla"  # auto | xla | pallas_interpret | pallas_gpu | pallas_tpu
    scan_layers: bool = True  # scan over runs of identical layers: compile time flat in depth
    remat: str = "none"  # none | full | dots (checkpoint policy for training)
    # none | ring | allgather: how training attention (no cache) spans the `seq` mesh axis
    context_parallel: str = "none"

    def __post_init__(self):
        _check(self.attention in IMPLEMENTATIONS, "kernels.attention",
               f"{self.attention!r} is not one of {IMPLEMENTATIONS}")
        _check(self.remat in ("none", "full", "dots"), "kernels.remat",
               f"{self.remat!r} is not one of none, full, dots")
        _check(self.context_parallel in ("none", "ring", "allgather"), "kernels.context_parallel",
               f"{self.context_parallel!r} is not one of none, ring, allgather")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder of `len(layer_pattern)` blocks, each with the mixer of its kind and a SwiGLU MLP."""

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    layer_pattern: tuple[str, ...] = ("dense",) * 4
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    lambda_: LambdaConfig | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def __post_init__(self):
        pattern = tuple(self.layer_pattern)
        object.__setattr__(self, "layer_pattern", pattern)
        _check(len(pattern) > 0, "layer_pattern", "needs at least one layer")
        for i, kind in enumerate(pattern):
            _check(kind in LAYER_KINDS, f"layer_pattern[{i}]", f"{kind!r} is not one of {LAYER_KINDS}")
        if "lambda" in pattern and self.lambda_ is None:
            object.__setattr__(self, "lambda_", LambdaConfig.for_context(
                self.attention.max_position_embeddings))
        built = {"dense", "lambda"}
        for kind in set(pattern) - built:
            raise ConfigError(f"layer_pattern: layer kind {kind!r} is not available in this version")
        _check(self.vocab_size > 0, "vocab_size", "must be > 0")
        _check(self.hidden_size > 0, "hidden_size", "must be > 0")
        _check(self.intermediate_size > 0, "intermediate_size", "must be > 0")
        _check(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {DTYPES}")
        _check(self.param_dtype in DTYPES, "param_dtype", f"{self.param_dtype!r} is not one of {DTYPES}")
        att = self.attention
        if att.hidden_size == 0 or att.head_dim == 0:
            att = dataclasses.replace(
                att, hidden_size=att.hidden_size or self.hidden_size,
                head_dim=att.head_dim or self.hidden_size // att.num_heads)
            object.__setattr__(self, "attention", att)
        _check(att.hidden_size == self.hidden_size, "attention.hidden_size",
               f"{att.hidden_size} differs from hidden_size {self.hidden_size}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def runs(self) -> tuple[tuple[str, int], ...]:
        """Maximal runs of identical consecutive layer kinds: ((kind, count), ...)."""
        out: list[list] = []
        for kind in self.layer_pattern:
            if out and out[-1][0] == kind:
                out[-1][1] += 1
            else:
                out.append([kind, 1])
        return tuple((k, n) for k, n in out)

    def mixer_config(self, kind: str) -> Any:
        """The sub-config handed to the mixer of `kind` (mixers never see the whole ModelConfig)."""
        if kind == "dense":
            return self.attention
        if kind == "lambda":
            fields = {f.name: getattr(self.attention, f.name)
                      for f in dataclasses.fields(AttentionConfig)}
            return LambdaAttentionConfig(**fields, lambda_=self.lambda_)
        raise ConfigError(f"layer_pattern: layer kind {kind!r} is not available in this version")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- layer patterns


def parse_layer_pattern(value: Any, num_layers: int | None, where: str = "layer_pattern"
                        ) -> tuple[str, ...]:
    """Accepts a list of kinds, a single kind (all layers), `"dense*4,lambda*28"`, or a mapping
    `{default: lambda, dense: [0, 8, 16]}` listing the layers of each other kind."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    if isinstance(value, dict):
        _check(num_layers is not None, where, "a mapping needs num_layers")
        value = dict(value)
        default = value.pop("default", "dense")
        out = [default] * num_layers
        for kind, layers in value.items():
            _check(isinstance(layers, (list, tuple)), f"{where}.{kind}", "must be a list of layer indices")
            for i in layers:
                _check(isinstance(i, int) and 0 <= i < num_layers, f"{where}.{kind}",
                       f"layer index {i!r} out of range 0..{num_layers - 1}")
                out[i] = kind
        return tuple(out)
    if isinstance(value, str):
        out = []
        for part in value.replace(" ", "").split(","):
            if "*" in part:
                kind, count = part.split("*", 1)
                _check(count.isdigit(), where, f"bad repeat count in {part!r}")
                out += [kind] * int(count)
            elif part:
                out.append(part)
        if len(out) == 1 and num_layers is not None and "*" not in value:
            out = out * num_layers
        return tuple(out)
    raise ConfigError(f"{where}: expected a list, a string or a mapping, got {type(value).__name__}")


# ----------------------------------------------------------------------------- dict / YAML -> dataclass


def _yaml_name(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")  # `lambda_` is spelled `lambda` in YAML


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, recursively; unknown keys and bad types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_name(f): f for f in dataclasses.fields(cls)}
    kwargs = {}
    prefix = f"{where}." if where else ""
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(fields))})")
        f = fields[key]
        kwargs[f.name] = _coerce(hints[f.name], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def to_dict(obj: Any) -> Any:
    """Inverse of `from_dict`: plain dicts/lists with YAML key names."""
    if dataclasses.is_dataclass(obj):
        return {_yaml_name(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def model_config_from_dict(data: dict, where: str = "model") -> ModelConfig:
    """`ModelConfig` from a YAML mapping; `num_layers` plus a short `layer_pattern` expand."""
    data = dict(data)
    num_layers = data.pop("num_layers", None)
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)):
        raise ConfigError(f"{where}.num_layers: expected an integer, got {num_layers!r}")
    pattern = data.pop("layer_pattern", "dense")
    pattern = parse_layer_pattern(pattern, num_layers, f"{where}.layer_pattern")
    if num_layers is not None and len(pattern) != num_layers:
        raise ConfigError(f"{where}.layer_pattern: has {len(pattern)} layers but num_layers is {num_layers}")
    data["layer_pattern"] = list(pattern)
    return from_dict(ModelConfig, data, where)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """`set_dotted(d, "model.lambda.window", 4096)` creates intermediate mappings as needed."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {k} is not a mapping")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings (values parsed with yaml.safe_load) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with `yaml.safe_load`; errors name the file."""
    path = Path(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """A model preset (`configs/models/*.yaml`, top-level key `model`) with dotted overrides."""
    data = load_yaml(path)
    data = apply_overrides(data, [o if o.startswith("model.") else f"model.{o}" for o in overrides])
    if set(data) != {"model"}:
        extra = sorted(set(data) - {"model"}) or ["model (missing)"]
        raise ConfigError(f"{path}: {extra[0]}: unknown top-level key (a model preset holds `model:`)")
    try:
        return model_config_from_dict(data["model"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
