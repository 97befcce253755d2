"""HF Llama `config.json` <-> `ModelConfig`.

Reads both forms transformers has written: 4.x (`rope_theta` and `rope_scaling` at the top level,
the scaling type under `rope_type` or the older `type`) and 5.x (`rope_parameters` holding
`rope_theta` and `rope_type`). Writes the 4.x form, which every transformers version since 4.45
loads. Missing keys take
`transformers.LlamaConfig`'s defaults.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from jaxllama.checkpoint.base import CheckpointError, check_hf_layout
from jaxllama.config import DEFAULT_KIND, AttentionConfig, ConfigError, ModelConfig, RopeConfig

# model_type -> the module reading and writing that format (imported on use: it imports this one)
OTHER_FORMATS = {
    "longllama": lambda: importlib.import_module("jaxllama.checkpoint.longllama"),
    "deepseek_v2": lambda: importlib.import_module("jaxllama.checkpoint.deepseek"),
    "deepseek_v3": lambda: importlib.import_module("jaxllama.checkpoint.deepseek"),
}
SUPPORTED_MODEL_TYPES = ("llama", *OTHER_FORMATS)
_SCALED_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


def _rope_dict(raw: dict, where: str) -> dict:
    """The rope parameters of either form as one flat dict with `rope_type` and `rope_theta`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{where}: per-layer-type rope_parameters are not supported")
    rope = dict(params or raw.get("rope_scaling") or {})
    rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if "partial_rotary_factor" in raw:
        rope.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    return rope


def rope_from_hf(raw: dict, where: str) -> RopeConfig:
    """`RopeConfig` from a config.json dict, with every derived default made explicit."""
    rope = _rope_dict(raw, where)
    t = rope["rope_type"]
    if t not in ("default",) + _SCALED_TYPES:
        raise CheckpointError(f"{where}: rope type {t!r} is not supported "
                              f"(supported: default, {', '.join(_SCALED_TYPES)})")
    max_pos = raw.get("max_position_embeddings", 2048)
    kw: dict[str, Any] = {"theta": float(rope["rope_theta"]), "type": t,
                          "partial_rotary_factor": float(rope.get("partial_rotary_factor") or 1.0)}
    if t == "default":
        return RopeConfig(**kw)
    orig = rope.get("original_max_position_embeddings")
    if t in ("yarn", "longrope", "llama3"):
        # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style).
        orig = raw.get("original_max_position_embeddings", orig) or max_pos
        kw["original_max_position_embeddings"] = int(orig)
    factor = rope.get("factor")
    if factor is None and t in ("yarn", "longrope"):
        factor = max_pos / orig
    if factor is None:
        raise CheckpointError(f"{where}: rope type {t!r} needs a `factor`")
    kw["factor"] = float(factor)
    if t == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in rope:
                raise CheckpointError(f"{where}: rope type llama3 needs `{key}`")
            kw[key] = float(rope[key])
    if t == "yarn":
        kw.update(beta_fast=float(rope.get("beta_fast") or 32.0),
                  beta_slow=float(rope.get("beta_slow") or 1.0),
                  truncate=bool(rope.get("truncate", True)))
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if rope.get(key) is not None:
                kw[key] = float(rope[key])
    if t == "longrope":
        for key in ("short_factor", "long_factor"):
            if not isinstance(rope.get(key), list):
                raise CheckpointError(f"{where}: rope type longrope needs a `{key}` list")
            kw[key] = tuple(float(x) for x in rope[key])
        af = rope.get("attention_factor")
        if af is None:  # derived here so a factor of exactly 1.0 keeps transformers' meaning
            af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        kw["attention_factor"] = float(af)
    try:
        return RopeConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_from_hf(raw: dict, where: str) -> ModelConfig:
    """`ModelConfig` (all layers dense) from a parsed HF Llama config.json (`where`: the file)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    model_type = raw.get("model_type", "llama")
    if model_type in OTHER_FORMATS:
        return OTHER_FORMATS[model_type]().config_from_hf(raw, where)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if not isinstance(raw.get(key), int):
            raise CheckpointError(f"{where}: `{key}` is missing or not an integer")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (silu only)")
    if raw.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    heads = raw["num_attention_heads"]
    try:
        att = AttentionConfig(
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rope=rope_from_hf(raw, where),
            bias=bool(raw.get("attention_bias", False)))
        return ModelConfig(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            layer_pattern=(DEFAULT_KIND,) * raw["num_hidden_layers"],
            max_position_embeddings=raw.get("max_position_embeddings", 2048), attention=att,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def rope_to_hf(rope: RopeConfig) -> dict | None:
    """The 4.x `rope_scaling` dict (None for plain RoPE)."""
    if rope.type == "default":
        return None
    out: dict[str, Any] = {"rope_type": rope.type, "factor": rope.factor}
    if rope.original_max_position_embeddings is not None and rope.type != "dynamic":
        out["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.type == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(rope, key) is not None:
                out[key] = getattr(rope, key)
    if rope.type == "longrope":
        out.update(short_factor=list(rope.short_factor), long_factor=list(rope.long_factor))
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    return out


def config_to_hf(cfg: ModelConfig, generation_config: dict | None = None,
                 torch_dtype: str = "float32") -> dict:
    """HF Llama config.json (4.x form) for `cfg`; a layer whose kind has no HF tensors is refused
    (lambda layers export as plain Llama layers: their weights are the same)."""
    deepseek = OTHER_FORMATS["deepseek_v3"]()
    if deepseek.writes(cfg):  # a model with MLA layers is written as DeepSeek-V3 (or V2)
        return deepseek.config_to_hf(cfg, generation_config, torch_dtype)
    check_hf_layout(cfg)
    if cfg.fot is not None:  # a model with FoT layers is written as LongLLaMA
        return OTHER_FORMATS["longllama"]().config_to_hf(cfg, generation_config, torch_dtype)
    a = cfg.attention
    gen = generation_config or {}
    eos = list(gen.get("eos_token_ids") or [])
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim_for(cfg.hidden_size),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": a.rope.theta,
        "rope_scaling": rope_to_hf(a.rope),
        "attention_bias": a.bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "bos_token_id": gen.get("bos_token_id"),
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "pad_token_id": gen.get("pad_token_id"),
    }
    if a.rope.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = a.rope.partial_rotary_factor
    return out


def generation_from_hf(gen: dict, raw_config: dict, tokenizer=None) -> dict:
    """Our generation_config dict from generation_config.json (may be {}), config.json and the
    tokenizer."""

    def pick(key):
        for src in (gen, raw_config):
            if src.get(key) is not None:
                return src[key]
        return None

    eos = pick("eos_token_id")
    if eos is None and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos])]
    bos = pick("bos_token_id")
    if bos is None and tokenizer is not None:
        bos = tokenizer.bos_token_id
    pad = pick("pad_token_id")
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None and eos_ids:
        pad = eos_ids[0]
    out = {"eos_token_ids": eos_ids, "bos_token_id": bos, "pad_token_id": pad}
    for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                "max_new_tokens"):
        if gen.get(key) is not None:
            out[key] = gen[key]
    return out


def generation_to_hf(gen: dict) -> dict:
    """generation_config.json contents for our generation_config dict."""
    eos = list(gen.get("eos_token_ids") or [])
    out = {"bos_token_id": gen.get("bos_token_id"),
           "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
           "pad_token_id": gen.get("pad_token_id")}
    for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                "max_new_tokens"):
        if key in gen:
            out[key] = gen[key]
    return {k: v for k, v in out.items() if v is not None}
