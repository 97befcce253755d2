"""The layer-kind registry: one `MixerSpec` per mixer file, keyed by kind name.

Every mixer is built as `spec.module(cfg=spec.config(model_cfg), kernels=..., dtype=...,
param_dtype=...)` and called as `(x, positions, cache=None, segment_ids=None) -> (y, cache)`.
Code outside this package asks `spec_of(kind)` instead of comparing kind names; a new kind is
one more file here and one more entry in `REGISTRY` (see docs/adding_a_layer_kind.md).
"""

from __future__ import annotations

from jaxllama.config import KIND_FIELDS, ConfigError
from jaxllama.mixers import attention, fot_attention, lambda_attention, mamba, mamba2, mla_attention
from jaxllama.mixers.attention import Attention, AttentionLayerConfig, KVCache
from jaxllama.mixers.lambda_attention import LambdaAttention, LambdaAttentionConfig, LambdaCache
from jaxllama.mixers.mamba import MambaCache, MambaLayerConfig, MambaMixer
from jaxllama.mixers.mamba2 import Mamba2Cache, Mamba2LayerConfig, Mamba2Mixer
from jaxllama.mixers.spec import HFTensor, MixerSpec

REGISTRY: dict[str, MixerSpec] = {s.kind: s for s in (attention.SPEC, lambda_attention.SPEC,
                                                       fot_attention.SPEC,
                                                       fot_attention.LOCAL_SPEC, mamba.SPEC,
                                                       mamba2.SPEC, mla_attention.SPEC)}

for _spec in REGISTRY.values():  # the config's kind table and the specs must agree
    if KIND_FIELDS.get(_spec.kind) != _spec.config_field:
        raise ImportError(f"mixers: {_spec.kind} spec has config_field {_spec.config_field!r}, "
                          f"config.KIND_FIELDS says {KIND_FIELDS.get(_spec.kind)!r}")
if set(KIND_FIELDS) != set(REGISTRY):
    raise ImportError(f"mixers: config.KIND_FIELDS {sorted(KIND_FIELDS)} and the registry "
                      f"{sorted(REGISTRY)} name different kinds")


def spec_of(kind: str) -> MixerSpec:
    """The spec of a layer kind; a one-line `ConfigError` for a kind nobody registered."""
    spec = REGISTRY.get(kind)
    if spec is None:
        raise ConfigError(f"layer kind {kind!r} is not registered (registered: "
                          f"{', '.join(REGISTRY)})")
    return spec


def check_model(cfg) -> None:
    """What a `ModelConfig` must satisfy that only the specs know (run by its __post_init__,
    so before anything is traced): each kind of the pattern runs `kernels.context_parallel`."""
    mode = cfg.kernels.context_parallel
    if mode == "none":
        return
    for i, kind in enumerate(cfg.layer_pattern):
        if mode not in spec_of(kind).context_parallel:
            can = ", ".join(spec_of(kind).context_parallel) or "none"
            raise ConfigError(f"kernels.context_parallel: {mode!r} is not supported by {kind} "
                              f"layers (layer {i}; {kind} supports: {can})")


__all__ = ["REGISTRY", "Attention", "AttentionLayerConfig", "HFTensor", "KVCache",
           "LambdaAttention", "LambdaAttentionConfig", "LambdaCache", "Mamba2Cache",
           "Mamba2LayerConfig", "Mamba2Mixer", "MambaCache", "MambaLayerConfig", "MambaMixer",
           "MixerSpec", "check_model", "spec_of"]
