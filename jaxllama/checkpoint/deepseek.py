"""HF DeepSeek-V2 / V3 `config.json` <-> `ModelConfig` of `mla` layers with dense SwiGLU MLPs.

The tensors need nothing here: the MLA spec's table (`mixers/mla_attention.hf_tensors`) names the
`self_attn.*` tensors, and the block's norms and `mlp.{gate,up,down}_proj` are the Llama names
DeepSeek's dense MLP layers use too. In scope are checkpoints whose MLP layers are all dense
(`first_k_dense_replace >= num_hidden_layers`, as GQA-to-MLA conversions of Llamas write them);
MoE layers are a one-line error naming that field. Export always writes `deepseek_v3` (it has
`rope_interleave`, so both RoPE layouts round-trip; a V2 checkpoint loads back as V3 with the
same logits) with no multi-token-prediction layers.
"""

from __future__ import annotations

from typing import Any

from jaxllama.checkpoint.base import CheckpointError
from jaxllama.checkpoint.hf_config import rope_from_hf, rope_to_hf
from jaxllama.config import ConfigError, MLAConfig, ModelConfig
from jaxllama.mixers.mla_attention import SPEC as MLA

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# transformers' defaults where a config.json leaves a field out
_DENSE_DEFAULT = {"deepseek_v2": 0, "deepseek_v3": 3}
_NORM_EPS = 1e-6  # DeepseekV{2,3}RMSNorm of q_a_layernorm / kv_a_layernorm (not configurable)


def _int(raw: dict, key: str, where: str, default: Any = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: `{key}` is missing or not an integer")
    return value


def config_from_hf(raw: dict, where: str) -> ModelConfig:
    """`ModelConfig` (every layer `mla`) from a parsed DeepSeek-V2/V3 config.json."""
    model_type = raw["model_type"]
    layers = _int(raw, "num_hidden_layers", where)
    dense = raw.get("first_k_dense_replace", _DENSE_DEFAULT[model_type])
    if not isinstance(dense, int) or dense < layers:
        raise CheckpointError(f"{where}: first_k_dense_replace {dense} < num_hidden_layers "
                              f"{layers}: MoE layers are not supported (dense MLPs only)")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported "
                              "(silu only)")
    if raw.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    heads = _int(raw, "num_attention_heads", where)
    kv_heads = raw.get("num_key_value_heads") or heads
    if kv_heads != heads:  # transformers sizes kv_b_proj by num_attention_heads regardless
        raise CheckpointError(f"{where}: num_key_value_heads {kv_heads} != num_attention_heads "
                              f"{heads} has no DeepSeek layout (kv_b_proj is per query head)")
    q_lora = raw.get("q_lora_rank", 1536)  # null: a direct query projection
    interleave = model_type == "deepseek_v2" or bool(raw.get("rope_interleave", True))
    try:
        mla = MLAConfig(
            num_heads=heads,
            q_lora_rank=q_lora, kv_lora_rank=_int(raw, "kv_lora_rank", where, 512),
            qk_nope_head_dim=_int(raw, "qk_nope_head_dim", where, 128),
            qk_rope_head_dim=_int(raw, "qk_rope_head_dim", where, 64),
            v_head_dim=_int(raw, "v_head_dim", where, 128), norm_eps=_NORM_EPS,
            rope=rope_from_hf({k: v for k, v in raw.items() if k != "partial_rotary_factor"},
                              where),
            rope_interleave=interleave, bias=bool(raw.get("attention_bias", False)))
        return ModelConfig(
            vocab_size=_int(raw, "vocab_size", where),
            hidden_size=_int(raw, "hidden_size", where),
            intermediate_size=_int(raw, "intermediate_size", where),
            layer_pattern=(MLA.kind,) * layers,
            max_position_embeddings=raw.get("max_position_embeddings", 2048), mla=mla,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def writes(cfg: ModelConfig) -> bool:
    """Whether `cfg` is exported in the DeepSeek format (it has MLA layers)."""
    return MLA.kind in cfg.layer_pattern


def _check_exportable(cfg: ModelConfig) -> MLAConfig:
    for i, kind in enumerate(cfg.layer_pattern):
        if kind != MLA.kind:
            raise CheckpointError(f"layer {i}: a DeepSeek checkpoint holds only {MLA.kind} "
                                  f"layers, not {kind!r}")
    m = cfg.mla
    if m.num_kv_heads not in (None, m.num_heads):
        raise CheckpointError(f"mla.num_kv_heads: {m.num_kv_heads} (a GQA-width kv_b, "
                              "Zebra-Llama's layout) has no DeepSeek layout: transformers sizes "
                              "kv_b_proj by num_attention_heads")
    if m.q_lora_rank is not None and not m.q_a_layernorm:
        raise CheckpointError("mla.q_a_layernorm: false has no DeepSeek layout (transformers "
                              "always normalises the query latent)")
    if not m.kv_a_layernorm:
        raise CheckpointError("mla.kv_a_layernorm: false has no DeepSeek layout")
    if m.norm_eps != _NORM_EPS:
        raise CheckpointError(f"mla.norm_eps: {m.norm_eps} has no DeepSeek layout "
                              f"(transformers uses {_NORM_EPS})")
    return m


def config_to_hf(cfg: ModelConfig, generation_config: dict | None = None,
                 torch_dtype: str = "float32") -> dict:
    """HF `deepseek_v3` config.json for an all-`mla` `cfg` (dense MLPs, no MTP layers)."""
    m = _check_exportable(cfg)
    gen = generation_config or {}
    eos = list(gen.get("eos_token_ids") or [])
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "first_k_dense_replace": cfg.num_layers,
        "num_nextn_predict_layers": 0,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_heads,
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": m.rope.theta,
        "rope_scaling": rope_to_hf(m.rope),
        "rope_interleave": m.rope_interleave,
        "attention_bias": m.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "bos_token_id": gen.get("bos_token_id"),
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "pad_token_id": gen.get("pad_token_id"),
    }


__all__ = ["MODEL_TYPES", "config_from_hf", "config_to_hf", "writes"]
