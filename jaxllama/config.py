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

LayerKind = Literal["dense", "lambda", "fot", "fot_local", "mla", "mamba", "mamba2"]
LAYER_KINDS: tuple[str, ...] = typing.get_args(LayerKind)
DEFAULT_KIND: LayerKind = "dense"
# The one table of kind names outside `jaxllama/mixers/` (the mixers import this module, so it
# cannot import them at load time):
# each built kind -> the `ModelConfig` field holding its own knobs (None: none beyond the model's).
# The registry checks at import that every spec's `config_field` agrees; a kind of `LayerKind`
# missing here is not built yet.
KIND_FIELDS: dict[str, str | None] = {"dense": "attention", "lambda": "lambda_", "fot": "fot",
                                      "fot_local": "fot", "mamba": "mamba", "mamba2": "mamba2",
                                      "mla": "mla"}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
IMPLEMENTATIONS = ("auto", "xla", "xla_masked", "pallas_interpret", "pallas_gpu",
                   "pallas_tpu")


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
    """GQA attention knobs (YAML `attention:`), read by the dense and lambda layers. The model's
    width and context length live on `ModelConfig`; `head_dim` 0 means hidden_size // num_heads,
    resolved by the layer config built from the model (`AttentionLayerConfig.head_dim`)."""

    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 0
    rope: RopeConfig = field(default_factory=RopeConfig)
    bias: bool = False

    def __post_init__(self):
        _check(self.num_heads > 0, "attention.num_heads", "must be > 0")
        _check(self.num_kv_heads > 0, "attention.num_kv_heads", "must be > 0")
        _check(self.num_heads % self.num_kv_heads == 0, "attention.num_kv_heads",
               f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        _check(self.head_dim >= 0 and self.head_dim % 2 == 0, "attention.head_dim",
               f"must be even, got {self.head_dim}")

    def head_dim_for(self, hidden_size: int) -> int:
        """H: `head_dim`, or hidden_size // num_heads when it is 0."""
        return self.head_dim or hidden_size // self.num_heads


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
        _check(n > 0, "max_position_embeddings", f"no default lambda window for a trained "
               f"context of {n} tokens: add model.lambda.window=N")
        return cls(global_tokens=min(100, n), window=n, distance=n)


@dataclass(frozen=True)
class MambaConfig:
    """Mamba1 selective-scan layers (YAML `mamba:`, METHODS section 9): inner width E =
    expand x hidden_size, state size N, causal depthwise conv of width W, dt rank R (0 =
    ceil(hidden_size / 16)), B and C shared by `n_groups` groups of E / n_groups channels (1 =
    plain Mamba1; Mamba-in-the-Llama's conversion uses more)."""

    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int = 0
    n_groups: int = 1
    use_bias: bool = False  # in_proj, out_proj
    use_conv_bias: bool = True

    def __post_init__(self):
        for name in ("state_size", "expand", "conv_kernel", "n_groups"):
            _check(getattr(self, name) > 0, f"mamba.{name}", "must be > 0")
        _check(self.time_step_rank >= 0, "mamba.time_step_rank", "must be >= 0 (0 = auto)")


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba2 (SSD) layers (YAML `mamba2:`): `num_heads` heads of `head_dim` channels (0 =
    expand x hidden_size / head_dim), scalar decay per head, B and C in `n_groups` groups of
    `state_size`, conv over [x, B, C], gated RMSNorm over groups of `norm_group_size` channels
    (0 = E / n_groups) with `norm_eps` (None = the model's rms_norm_eps), D per head or per
    channel, dt clamped to `time_step_limit`. `xb_heads` > 0 is Zebra-Llama's variant: x and B
    have `xb_heads` heads (x of head_dim, B of state_size channels) that are repeated over the
    heads after the conv (fixtures/zebra-tiny/README.md "Semantics")."""

    num_heads: int = 0
    head_dim: int = 64
    expand: int = 2
    state_size: int = 128
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    time_step_limit: tuple[float, ...] = (0.0, float("inf"))
    norm_before_gate: bool = False
    norm_group_size: int = 0
    norm_eps: float | None = None
    d_per_channel: bool = False
    xb_heads: int = 0

    def __post_init__(self):
        for name in ("head_dim", "expand", "state_size", "n_groups", "conv_kernel",
                     "chunk_size"):
            _check(getattr(self, name) > 0, f"mamba2.{name}", "must be > 0")
        for name in ("num_heads", "norm_group_size", "xb_heads"):
            _check(getattr(self, name) >= 0, f"mamba2.{name}", "must be >= 0")
        lo_hi = self.time_step_limit
        _check(len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1], "mamba2.time_step_limit",
               f"must be [min, max] with 0 <= min < max, got {list(lo_hi)}")
        if self.xb_heads:
            _check(self.head_dim == self.state_size, "mamba2.xb_heads",
                   f"needs head_dim == state_size, got {self.head_dim} and {self.state_size}")
            _check(self.n_groups % self.xb_heads == 0, "mamba2.xb_heads",
                   f"{self.xb_heads} does not divide n_groups {self.n_groups}")

    def heads_for(self, hidden_size: int) -> int:
        """h: `num_heads`, or expand x hidden_size / head_dim when it is 0."""
        return self.num_heads or self.expand * hidden_size // self.head_dim


@dataclass(frozen=True)
class FoTConfig:
    """Focused Transformer memory layers (LongLLaMA, METHODS section 7), read by `fot` (memory)
    and `fot_local` (LongLLaMA's other layers) layers. The local window is the model's
    `max_position_embeddings`. `mem_attention_grouping` (heads, queries) is the reference's loop
    split, which changes no result: accepted and unused. `torch_attention` and
    `gradient_checkpoint_every_ith` are the reference's runtime switches, kept only so a LongLLaMA
    config.json is written back as it was read."""

    last_context_length: int = 1024  # the tail of a prompt kept out of memory (local cache)
    mem_positionals: bool = True  # memory layers use RoPE (memory keys as if at position 0)
    mem_dtype: str = "bfloat16"  # memory keys and values are stored in this dtype
    mem_attention_grouping: tuple[int, ...] | None = None
    torch_attention: bool = False
    gradient_checkpoint_every_ith: int = 1
    # training only: a pass without cache reads, in each memory layer, the previous d rows of the
    # batch (cross-batch, METHODS section 7); 0 = the reference's windowed forward
    cross_batch_range: int = 0
    # beyond the reference: each query head reads only its k highest-scoring memory slots (the
    # Focused Transformer paper's kNN memory); 0 = the whole memory (exact)
    mem_top_k: int = 0

    def __post_init__(self):
        _check(self.last_context_length >= 1, "fot.last_context_length", "must be >= 1")
        _check(self.cross_batch_range >= 0, "fot.cross_batch_range", "must be >= 0")
        _check(self.mem_top_k >= 0, "fot.mem_top_k", "must be >= 0")
        _check(self.mem_dtype in DTYPES, "fot.mem_dtype",
               f"{self.mem_dtype!r} is not one of {DTYPES}")
        g = self.mem_attention_grouping
        _check(g is None or (len(g) == 2 and min(g) > 0), "fot.mem_attention_grouping",
               f"must be null or two positive integers (heads, queries), got {g}")

    @classmethod
    def for_context(cls, n: int) -> FoTConfig:
        """Defaults for a `fot` pattern given without a `fot` section: LongLLaMA's ratio of tail
        to window (1024 of 2048), at most 1024."""
        return cls(last_context_length=max(1, min(1024, n // 2)))


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention knobs (YAML `mla:`, METHODS section 8), read by `mla` layers.

    DeepSeek-V2/V3 by default; Zebra-Llama's variant is configuration, not a fork:
    `num_kv_heads` < `num_heads` gives a `kv_b_proj` at GQA width whose kv heads are repeated over
    contiguous query-head groups, `q_a_layernorm` / `kv_a_layernorm` false are identities, and a
    yarn `rope` without `mscale_all_dim` scales cos/sin by mscale with no softmax correction
    (with `mscale_all_dim`, the softmax scale is multiplied by mscale(factor, mscale_all_dim)^2,
    as DeepSeek does). `rope_interleave`: the rope dims rotate in adjacent pairs (2i, 2i+1), as
    DeepSeek checkpoints lay them out; false is rotate-half."""

    num_heads: int = 8  # N
    num_kv_heads: int | None = None  # heads of kv_b_proj; None = num_heads (DeepSeek)
    q_lora_rank: int | None = None  # None: a direct q_proj
    kv_lora_rank: int = 64  # L
    qk_nope_head_dim: int = 32  # H: the un-rotated part of a query/key head
    qk_rope_head_dim: int = 16  # R: the rotated part, one key head shared by all query heads
    v_head_dim: int = 32  # U
    q_a_layernorm: bool = True
    kv_a_layernorm: bool = True
    norm_eps: float = 1e-6  # the two latent RMSNorms (transformers' DeepseekV3RMSNorm default)
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    bias: bool = False  # attention_bias: q_a_proj / q_proj, kv_a_proj_with_mqa, o_proj
    # one-token decode: `absorbed` (attention in latent space over the cache) or `expanded`
    # (keys and values re-expanded from the whole cache each step; for comparison)
    decode: str = "absorbed"

    def __post_init__(self):
        _check(self.decode in ("absorbed", "expanded"), "mla.decode",
               f"{self.decode!r} is not one of absorbed, expanded")
        for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            _check(getattr(self, name) > 0, f"mla.{name}", "must be > 0")
        _check(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
               "mla.qk_rope_head_dim", f"must be even and > 0, got {self.qk_rope_head_dim}")
        _check(self.q_lora_rank is None or self.q_lora_rank > 0, "mla.q_lora_rank",
               "must be > 0 (or null for a direct query projection)")
        k = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        _check(k > 0 and self.num_heads % k == 0, "mla.num_kv_heads",
               f"num_heads {self.num_heads} is not a multiple of num_kv_heads {k}")
        _check(self.rope.partial_rotary_factor == 1.0, "mla.rope.partial_rotary_factor",
               "must be 1 (the rope part has its own width, qk_rope_head_dim)")


# Sub-config fields that a layer pattern may leave out: built from the model's trained context
# (`max_position_embeddings`) when a config is read from a mapping (YAML, overrides, checkpoints).
CONTEXT_DEFAULTS = {"lambda_": LambdaConfig.for_context, "fot": FoTConfig.for_context}


@dataclass(frozen=True)
class KernelConfig:
    """Which implementation runs each op, and how the layer loop is compiled."""

    attention: str = "xla"  # auto | xla | xla_masked | pallas_interpret | pallas_gpu | pallas_tpu
    ssm_scan: str = "xla"  # the same names, for the selective-scan op (kernels/ssm_scan)
    scan_layers: bool = True  # scan over runs of identical layers: compile time flat in depth
    remat: str = "none"  # none | full | dots (checkpoint policy for training)
    # none | ring | allgather: how training attention (no cache) spans the `seq` mesh axis
    context_parallel: str = "none"

    def __post_init__(self):
        for op in ("attention", "ssm_scan"):  # one field per kernel op
            name = getattr(self, op)
            _check(name in IMPLEMENTATIONS, f"kernels.{op}",
                   f"{name!r} is not one of {IMPLEMENTATIONS}")
        _check(self.remat in ("none", "full", "dots"), "kernels.remat",
               f"{self.remat!r} is not one of none, full, dots")
        _check(self.context_parallel in ("none", "ring", "allgather"), "kernels.context_parallel",
               f"{self.context_parallel!r} is not one of none, ring, allgather")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder of `len(layer_pattern)` blocks, each with the mixer of its kind and a SwiGLU MLP
    (none when `intermediate_size` is 0, as in HF Mamba models).

    Fields that belong to the whole model (width, context length `max_position_embeddings`,
    norms, dtypes) live here; each kind's own knobs live in its sub-config field (`KIND_FIELDS`),
    and the mixer of a kind is built with `spec_of(kind).config(model_cfg)`.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    layer_pattern: tuple[str, ...] = (DEFAULT_KIND,) * 4
    max_position_embeddings: int = 2048
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    lambda_: LambdaConfig | None = None
    mamba: MambaConfig | None = None
    mamba2: Mamba2Config | None = None
    fot: FoTConfig | None = None
    mla: MLAConfig | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def __post_init__(self):
        pattern = self.layer_pattern
        _check(isinstance(pattern, tuple), "layer_pattern",
               f"must be a tuple of layer kinds, got {type(pattern).__name__}")
        _check(len(pattern) > 0, "layer_pattern", "needs at least one layer")
        for i, kind in enumerate(pattern):
            _check(kind in LAYER_KINDS, f"layer_pattern[{i}]", f"{kind!r} is not one of {LAYER_KINDS}")
            _check(kind in KIND_FIELDS, f"layer_pattern[{i}]",
                   f"layer kind {kind!r} is not available in this version")
        for kind in dict.fromkeys(pattern):
            if KIND_FIELDS[kind] is None:
                continue
            name = _yaml_name_of(KIND_FIELDS[kind])
            _check(getattr(self, KIND_FIELDS[kind]) is not None, name,
                   f"layer_pattern has {kind} layers but no `{name}` config (add one, e.g. "
                   f"model.{name}.<key>=<value>)")
        _check(self.vocab_size > 0, "vocab_size", "must be > 0")
        _check(self.hidden_size > 0, "hidden_size", "must be > 0")
        _check(self.intermediate_size >= 0, "intermediate_size", "must be >= 0 (0 = no MLP)")
        _check(self.max_position_embeddings > 0, "max_position_embeddings", "must be > 0")
        _check(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {DTYPES}")
        _check(self.param_dtype in DTYPES, "param_dtype", f"{self.param_dtype!r} is not one of {DTYPES}")
        # What only the registry knows (e.g. which kinds run `kernels.context_parallel`). Imported
        # here, not at the top: the mixers import this module.
        from jaxllama.mixers import check_model
        check_model(self)

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
        default = value.pop("default", DEFAULT_KIND)
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


def _yaml_name_of(name: str) -> str:
    return name.rstrip("_")  # `lambda_` is spelled `lambda` in YAML


def _yaml_name(f: dataclasses.Field) -> str:
    return _yaml_name_of(f.name)


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


def migrate_model_dict(data: dict, where: str = "model") -> dict:
    """A model mapping with the keys earlier versions wrote (presets, orbax `model.yaml`, train
    configs) moved to where they live now: `attention.max_position_embeddings` is the model's
    `max_position_embeddings`; `attention.hidden_size` (a copy of `hidden_size`) is dropped."""
    att = data.get("attention")
    if not isinstance(att, dict) or not {"max_position_embeddings", "hidden_size"} & set(att):
        return data
    data, att = dict(data), dict(att)
    if "max_position_embeddings" in att:
        value = att.pop("max_position_embeddings")
        if data.get("max_position_embeddings", value) != value:
            raise ConfigError(f"{where}.attention.max_position_embeddings: {value} differs from "
                              f"{where}.max_position_embeddings {data['max_position_embeddings']} "
                              "(set the context length once, as max_position_embeddings)")
        data["max_position_embeddings"] = value
    if "hidden_size" in att:
        value = att.pop("hidden_size")
        hidden = data.get("hidden_size", ModelConfig.__dataclass_fields__["hidden_size"].default)
        if value not in (0, hidden):
            raise ConfigError(f"{where}.attention.hidden_size: {value} differs from "
                              f"{where}.hidden_size {hidden}")
    data["attention"] = att
    return data


def model_config_from_dict(data: dict, where: str = "model") -> ModelConfig:
    """`ModelConfig` from a YAML mapping; `num_layers` plus a short `layer_pattern` expand; keys
    of earlier versions are migrated (`migrate_model_dict`)."""
    data = migrate_model_dict(dict(data), where)
    num_layers = data.pop("num_layers", None)
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)):
        raise ConfigError(f"{where}.num_layers: expected an integer, got {num_layers!r}")
    pattern = data.pop("layer_pattern", DEFAULT_KIND)
    pattern = parse_layer_pattern(pattern, num_layers, f"{where}.layer_pattern")
    if num_layers is not None and len(pattern) != num_layers:
        raise ConfigError(f"{where}.layer_pattern: has {len(pattern)} layers but num_layers is {num_layers}")
    data["layer_pattern"] = list(pattern)
    context = data.get("max_position_embeddings", ModelConfig.max_position_embeddings)
    for kind in dict.fromkeys(pattern):
        field_name = KIND_FIELDS.get(kind)
        key = field_name and _yaml_name_of(field_name)
        if field_name in CONTEXT_DEFAULTS and data.get(key) is None and isinstance(context, int):
            data[key] = to_dict(CONTEXT_DEFAULTS[field_name](context))
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
