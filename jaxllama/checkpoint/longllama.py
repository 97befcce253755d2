"""LongLLaMA HF directories (`model_type: longllama`) <-> `ModelConfig`.

LongLLaMA 3B, 3B v1.1 and Code 7B ship Llama tensors under Llama's names (`model.layers.{l}.
self_attn.{q,k,v,o}_proj.weight`, ...) with a `LongLlamaConfig` config.json: plain multi-head
attention (no `num_key_value_heads`), no RoPE scaling, and the FoT fields `mem_layers`,
`mem_positionals`, `mem_dtype`, `mem_attention_grouping`, `last_context_length`,
`torch_attention`, `gradient_checkpoint_every_ith`. Its memory layers become `fot` layers and the
others `fot_local` (the same local window without memory); the FoT fields live in `ModelConfig.fot`.
Tensors load and export through the Llama table (`hf.py`); `hf_config.py` sends this model type
here, and a config with a `fot` section is exported in this format.
"""

from __future__ import annotations

from typing import Any

from jaxllama.checkpoint.base import CheckpointError
from jaxllama.config import AttentionConfig, ConfigError, FoTConfig, ModelConfig, RopeConfig
from jaxllama.mixers.fot_attention import fot_pattern, mem_layers_of

MODEL_TYPE = "longllama"
# LongLlamaConfig's defaults (the reference's configuration_longllama.py)
DEFAULTS: dict[str, Any] = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                            "rope_theta": 10000.0, "tie_word_embeddings": False,
                            "last_context_length": 1024, "mem_layers": [],
                            "mem_positionals": True, "mem_dtype": "bfloat16",
                            "mem_attention_grouping": None, "torch_attention": False,
                            "gradient_checkpoint_every_ith": 1}


def _get(raw: dict, key: str):
    value = raw.get(key)
    return DEFAULTS[key] if value is None and key != "mem_attention_grouping" else value


def config_from_hf(raw: dict, where: str) -> ModelConfig:
    """`ModelConfig` from a parsed LongLLaMA config.json (`where`: the file, for errors)."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool):
            raise CheckpointError(f"{where}: `{key}` is missing or not an integer")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported "
                              "(silu only)")
    if raw.get("rope_scaling") is not None:
        raise CheckpointError(f"{where}: rope_scaling must be null (LongLLaMA does not scale "
                              "RoPE)")
    heads, layers = raw["num_attention_heads"], raw["num_hidden_layers"]
    if raw.get("num_key_value_heads") not in (None, heads):
        raise CheckpointError(f"{where}: num_key_value_heads {raw['num_key_value_heads']} "
                              f"differs from num_attention_heads {heads} (LongLLaMA attention "
                              "is multi-head)")
    mem = _get(raw, "mem_layers")
    if not isinstance(mem, list) or not all(isinstance(i, int) and 0 <= i < layers for i in mem):
        raise CheckpointError(f"{where}: mem_layers must be a list of layer indices in "
                              f"0..{layers - 1}, got {mem!r}")
    grouping = raw.get("mem_attention_grouping")
    try:
        fot = FoTConfig(
            last_context_length=int(_get(raw, "last_context_length")),
            mem_positionals=bool(_get(raw, "mem_positionals")),
            mem_dtype=str(_get(raw, "mem_dtype")),
            mem_attention_grouping=None if grouping is None else tuple(grouping),
            torch_attention=bool(_get(raw, "torch_attention")),
            gradient_checkpoint_every_ith=int(_get(raw, "gradient_checkpoint_every_ith")))
        att = AttentionConfig(num_heads=heads, num_kv_heads=heads,
                              head_dim=raw["hidden_size"] // heads,
                              rope=RopeConfig(theta=float(_get(raw, "rope_theta"))))
        return ModelConfig(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], layer_pattern=fot_pattern(layers, mem),
            max_position_embeddings=int(_get(raw, "max_position_embeddings")), attention=att,
            fot=fot, rms_norm_eps=float(_get(raw, "rms_norm_eps")),
            tie_word_embeddings=bool(_get(raw, "tie_word_embeddings")))
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_to_hf(cfg: ModelConfig, generation_config: dict | None = None,
                 torch_dtype: str = "float32") -> dict:
    """LongLLaMA config.json for `cfg` (every layer `fot` or `fot_local`, multi-head attention,
    plain RoPE), as `LongLlamaConfig.save_pretrained` writes it."""
    a, fot = cfg.attention, cfg.fot
    try:
        mem = mem_layers_of(cfg)
    except ValueError as e:
        raise CheckpointError(f"LongLLaMA export: {e}") from None
    h = a.head_dim_for(cfg.hidden_size)
    if a.num_kv_heads != a.num_heads or h * a.num_heads != cfg.hidden_size:
        raise CheckpointError(f"LongLLaMA export: attention must be multi-head with head_dim = "
                              f"hidden_size / num_heads (got {a.num_heads} heads, "
                              f"{a.num_kv_heads} kv heads, head_dim {h})")
    if a.rope.type != "default" or a.rope.partial_rotary_factor != 1.0 or a.bias:
        raise CheckpointError("LongLLaMA export: only plain RoPE on every dim and no attention "
                              "bias")
    gen = generation_config or {}
    eos = list(gen.get("eos_token_ids") or [])
    return {
        "architectures": ["LongLlamaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": a.rope.theta,
        "rope_scaling": None,
        "last_context_length": fot.last_context_length,
        "mem_layers": list(mem),
        "mem_positionals": fot.mem_positionals,
        "mem_dtype": fot.mem_dtype,
        "mem_attention_grouping": (None if fot.mem_attention_grouping is None
                                   else list(fot.mem_attention_grouping)),
        "torch_attention": fot.torch_attention,
        "gradient_checkpoint_every_ith": fot.gradient_checkpoint_every_ith,
        "torch_dtype": torch_dtype,
        "bos_token_id": gen.get("bos_token_id"),
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "pad_token_id": gen.get("pad_token_id"),
    }


__all__ = ["MODEL_TYPE", "config_from_hf", "config_to_hf"]
