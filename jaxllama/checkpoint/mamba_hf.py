"""transformers' Mamba checkpoints (`model_type` mamba: MambaForCausalLM, e.g. the
state-spaces/*-hf releases; mamba2: Mamba2ForCausalLM, e.g. Mamba-Codestral): config.json and the
tensor table.

An HF Mamba model is a stack of `norm -> mixer -> +x` blocks without an MLP: every layer of
one kind, `intermediate_size` 0 here. Tensor names: `backbone.embeddings.weight`,
`backbone.layers.{l}.norm.weight`, `backbone.layers.{l}.mixer.*` (the kind's own table,
`spec.hf_tensors`), `backbone.norm_f.weight` and `lm_head.weight` (absent when tied).
`checkpoint/hf.py` reads and writes the files; this module only says what they hold. The mixer
modules are imported directly (their `SPEC`), so no kind is named by a string here.

transformers' Mamba2 gates before its grouped RMSNorm whatever a config.json says about
`norm_before_gate`, so imports set `norm_before_gate` false and exports refuse true.
"""

from __future__ import annotations

import math
from typing import Any

from jaxllama.checkpoint.base import CheckpointError, TensorSpec
from jaxllama.config import ConfigError, Mamba2Config, MambaConfig, ModelConfig
from jaxllama.mixers import mamba, mamba2

# model_type -> (mixer spec, architecture name)
FORMATS = {"mamba": (mamba.SPEC, "MambaForCausalLM"), "mamba2": (mamba2.SPEC, "Mamba2ForCausalLM")}


def is_mamba_config(raw: Any) -> bool:
    """config.json (parsed) of an HF Mamba or Mamba2 model."""
    return isinstance(raw, dict) and raw.get("model_type") in FORMATS


def model_type_of(cfg: ModelConfig) -> str | None:
    """The HF Mamba model_type `cfg` exports as (every layer one Mamba kind and no MLP); None
    for a model with no Mamba layer. A model with Mamba layers in any other layout has no HF
    checkpoint form: a one-line error."""
    kinds = set(cfg.layer_pattern)
    mine = {k for k in kinds if k in {s.kind for s, _ in FORMATS.values()}}
    if not mine:
        return None
    if len(kinds) > 1 or cfg.intermediate_size:
        raise CheckpointError(f"layer_pattern: {', '.join(sorted(mine))} layers export only as "
                              "an HF Mamba model (every layer one kind, intermediate_size 0)")
    (kind,) = kinds
    return next(t for t, (s, _) in FORMATS.items() if s.kind == kind)


def _int(raw: dict, key: str, where: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: `{key}` is missing or not an integer")
    return value


def _float(value: Any, key: str, where: str) -> float:
    """A number of config.json; transformers 5 writes infinities as {"__float__": "Infinity"}
    (exports write the plain JSON `Infinity`, which every version reads)."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: `{key}` holds {value!r}, not a number") from None


def config_from_hf(raw: dict, where: str) -> ModelConfig:
    """`ModelConfig` of an HF Mamba / Mamba2 config.json (missing keys: transformers' defaults)."""
    model_type = raw["model_type"]
    spec, _ = FORMATS[model_type]
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (silu only)")
    hidden = _int(raw, "hidden_size", where)
    common = {"vocab_size": _int(raw, "vocab_size", where), "hidden_size": hidden,
              "intermediate_size": 0,
              "layer_pattern": (spec.kind,) * _int(raw, "num_hidden_layers", where),
              "rms_norm_eps": float(raw.get("layer_norm_epsilon", 1e-5))}
    try:
        if model_type == "mamba":
            rank = raw.get("time_step_rank", "auto")
            knobs = MambaConfig(
                state_size=_int(raw, "state_size", where, 16), expand=_int(raw, "expand", where, 2),
                conv_kernel=_int(raw, "conv_kernel", where, 4),
                time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
                use_bias=bool(raw.get("use_bias", False)),
                use_conv_bias=bool(raw.get("use_conv_bias", True)))
            return ModelConfig(**common, mamba=knobs,
                               tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)))
        if raw.get("rms_norm") is False:
            raise CheckpointError(f"{where}: rms_norm=false (no gated norm) is not supported")
        limit = raw.get("time_step_limit") or (0.0, float("inf"))
        knobs = Mamba2Config(
            num_heads=_int(raw, "num_heads", where, 128), head_dim=_int(raw, "head_dim", where, 64),
            expand=_int(raw, "expand", where, 2), state_size=_int(raw, "state_size", where, 128),
            n_groups=_int(raw, "n_groups", where, 8), conv_kernel=_int(raw, "conv_kernel", where, 4),
            chunk_size=_int(raw, "chunk_size", where, 256),
            use_bias=bool(raw.get("use_bias", False)),
            use_conv_bias=bool(raw.get("use_conv_bias", True)),
            time_step_limit=tuple(_float(v, "time_step_limit", where) for v in limit))
        if knobs.num_heads * knobs.head_dim != knobs.expand * hidden:
            raise CheckpointError(f"{where}: num_heads x head_dim {knobs.num_heads * knobs.head_dim}"
                                  f" != expand x hidden_size {knobs.expand * hidden}")
        return ModelConfig(**common, mamba2=knobs,
                           tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _refuse(cond: bool, field: str, why: str) -> None:
    if cond:
        raise CheckpointError(f"{field}: {why} has no HF Mamba2 form")


def config_to_hf(cfg: ModelConfig, generation_config: dict | None = None,
                 torch_dtype: str = "float32") -> dict:
    """HF config.json of an HF-Mamba-layout `cfg` (`model_type_of` not None); knobs transformers
    cannot express are refused in one line naming the field."""
    model_type = model_type_of(cfg)
    spec, arch = FORMATS[model_type]
    sub = spec.config(cfg)
    gen = generation_config or {}
    eos = list(gen.get("eos_token_ids") or [])
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "layer_norm_epsilon": cfg.rms_norm_eps, "hidden_act": "silu",
        "residual_in_fp32": True, "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True, "torch_dtype": torch_dtype,
        "bos_token_id": gen.get("bos_token_id"),
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "pad_token_id": gen.get("pad_token_id")}
    if model_type == "mamba":
        m = cfg.mamba
        if m.n_groups != 1:
            raise CheckpointError(f"mamba.n_groups: {m.n_groups} (grouped B and C) has no HF "
                                  "Mamba form")
        out.update(state_size=m.state_size, expand=m.expand, conv_kernel=m.conv_kernel,
                   time_step_rank=sub.dt_rank, use_bias=m.use_bias, use_conv_bias=m.use_conv_bias,
                   intermediate_size=sub.inner_size)
        return out
    m = cfg.mamba2
    _refuse(m.norm_before_gate, "mamba2.norm_before_gate", "true")
    _refuse(m.d_per_channel, "mamba2.d_per_channel", "D per channel")
    _refuse(bool(m.xb_heads), "mamba2.xb_heads", "Zebra-Llama's x/B heads")
    _refuse(sub.norm_group_size != sub.inner_size // m.n_groups, "mamba2.norm_group_size",
            f"{m.norm_group_size}")
    _refuse(sub.norm_eps != cfg.rms_norm_eps, "mamba2.norm_eps", "a norm eps of its own")
    _refuse(sub.inner_size != m.expand * cfg.hidden_size, "mamba2.num_heads",
            "num_heads x head_dim != expand x hidden_size")
    out.update(num_heads=sub.num_heads, head_dim=m.head_dim, state_size=m.state_size,
               expand=m.expand, n_groups=m.n_groups, conv_kernel=m.conv_kernel,
               chunk_size=m.chunk_size, use_bias=m.use_bias, use_conv_bias=m.use_conv_bias,
               time_step_limit=list(m.time_step_limit), time_step_rank=math.ceil(
                   cfg.hidden_size / 16))
    return out


def tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the HF Mamba checkpoint of `cfg`, keyed by HF name."""
    spec, _ = FORMATS[model_type_of(cfg)]
    d, v = cfg.hidden_size, cfg.vocab_size
    mixer = spec.hf_tensors(spec.config(cfg))
    out: dict[str, TensorSpec] = {}

    def add(name, path, layer, hf_shape, shape, transpose):
        out[name] = TensorSpec(name, tuple(path), layer, tuple(hf_shape), tuple(shape), transpose)

    add("backbone.embeddings.weight", ("embed", "embedding"), None, (v, d), (v, d), False)
    for layer in range(cfg.num_layers):
        prefix = f"backbone.layers.{layer}."
        add(prefix + "norm.weight", ("mixer_norm", "scale"), layer, (d,), (d,), False)
        for t in mixer:
            add(prefix + t.hf_name, t.path, layer, t.hf_shape, t.shape, t.transpose)
    add("backbone.norm_f.weight", ("norm", "scale"), None, (d,), (d,), False)
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", ("lm_head", "kernel"), None, (v, d), (d, v), True)
    return out


__all__ = ["FORMATS", "config_from_hf", "config_to_hf", "is_mamba_config", "model_type_of",
           "tensor_specs"]
