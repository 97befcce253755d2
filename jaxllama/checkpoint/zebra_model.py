"""Zebra-Llama reference checkpoints as jaxllama models: `ModelConfig`, tensor table, load, export.

`checkpoint/zebra.py` describes the reference format (`ZebraLayout`, the files); this module maps
that description onto the `mla` and `mamba2` layer kinds (fixtures/zebra-tiny/README.md,
"Semantics"):

- MLA layers: `MLAConfig` with `kv_b_proj` at GQA width (`num_kv_heads` = the layout's
  `mla_kv_heads`, kv heads over contiguous query-head groups), latent RMSNorms only with
  `use_lora_layer_norm` (eps 1e-6), the layout's YaRN rope (cos/sin times mscale, no softmax
  correction: `mscale_all_dim` absent) on interleaved pairs.
- Mamba2 layers: `Mamba2Config` with `xb_heads` = d_xb / d_state (x and B at GQA width, repeated
  over the heads after the conv), one C group per head, headdim = d_state, gated RMSNorm per head
  with eps 1e-5 after the gate.

The tensors are each kind's own `hf_tensors` table with the reference's prefixes: `self_attn.*`
-> `mla.*` (`o_proj` -> `out_proj`), `mixer.*` -> `mamba.*`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxllama.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    TensorSource,
    TensorSpec,
    assemble_params,
    export_tensors,
    tensor_specs,
    with_dtype,
    with_overrides,
)
from jaxllama.checkpoint.zebra import ZebraLayout, ZebraTensors, read_layout, write_zebra
from jaxllama.config import ConfigError, Mamba2Config, MLAConfig, ModelConfig

MAMBA2_NORM_EPS = 1e-5  # hard-coded in the reference's gated RMSNorm (not rms_norm_eps)
MLA_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, the reference's latent norms
# (our kinds' HF name prefix, the reference's), first match wins
NAME_MAP = (("self_attn.o_proj.", "mla.out_proj."), ("self_attn.", "mla."), ("mixer.", "mamba."))


def reference_name(name: str) -> str:
    """Our kinds' HF tensor name (relative or full) -> the reference's name."""
    head, sep, rest = name.partition("model.layers.")
    if sep:
        layer, _, tail = rest.partition(".")
        return f"{head}{sep}{layer}.{reference_name(tail)}"
    for ours, ref in NAME_MAP:
        if name.startswith(ours):
            return ref + name[len(ours):]
    return name


def _mla_config(layout: ZebraLayout) -> MLAConfig:
    from jaxllama.checkpoint.hf_config import rope_from_hf
    ranks = {layout.ranks(i) for i in layout.mla_layers}
    if len(ranks) > 1:
        raise CheckpointError(f"hybrid_config.json: layer_rank_list gives the MLA layers "
                              f"different ranks {sorted(ranks, key=str)}; one rank pair per "
                              "model is supported")
    q_rank, kv_rank = ranks.pop()
    rope_raw = {"rope_theta": layout.rope_theta, "rope_scaling": layout.rope_scaling,
                "max_position_embeddings": layout.max_position_embeddings}
    return MLAConfig(
        num_heads=layout.num_attention_heads, num_kv_heads=layout.mla_kv_heads,
        q_lora_rank=q_rank, kv_lora_rank=kv_rank,
        qk_nope_head_dim=layout.qk_nope_head_dim, qk_rope_head_dim=layout.qk_rope_head_dim,
        v_head_dim=layout.v_head_dim, q_a_layernorm=layout.use_lora_layer_norm,
        kv_a_layernorm=layout.use_lora_layer_norm, norm_eps=MLA_NORM_EPS,
        rope=rope_from_hf(rope_raw, "hybrid_config.json"), rope_interleave=True,
        bias=layout.attention_bias)


def _mamba2_config(layout: ZebraLayout) -> Mamba2Config:
    if layout.repeat_kv_before_conv:
        raise CheckpointError("hybrid_config.json: ssm_cfg.repeat_kv_before_conv: true (x and B "
                              "repeated before the conv) is not supported")
    n, h = layout.d_state, layout.nheads
    return Mamba2Config(num_heads=h, head_dim=n, expand=max(1, layout.d_inner_ // layout.hidden_size),
                        state_size=n, n_groups=h, conv_kernel=layout.d_conv,
                        use_bias=False, use_conv_bias=True, norm_before_gate=False,
                        norm_group_size=layout.d_inner_ // h, norm_eps=MAMBA2_NORM_EPS,
                        d_per_channel=False, xb_heads=layout.d_xb // n)


def model_config(layout: ZebraLayout) -> ModelConfig:
    """The `ModelConfig` (`mla` and `mamba2` layers) of a reference-format checkpoint."""
    if layout.ssm_layer != "mamba2" and layout.ssm_layers:
        raise CheckpointError(f"hybrid_config.json: ssm_layer {layout.ssm_layer!r}: only Mamba2 "
                              "hybrids load as models")
    llama = layout.llama
    try:
        return ModelConfig(
            vocab_size=layout.vocab_size, hidden_size=layout.hidden_size,
            intermediate_size=layout.intermediate_size, layer_pattern=layout.kinds,
            max_position_embeddings=int(llama.get("max_position_embeddings",
                                                  layout.max_position_embeddings)),
            mla=_mla_config(layout) if layout.mla_layers else None,
            mamba2=_mamba2_config(layout) if layout.ssm_layers else None,
            rms_norm_eps=float(llama.get("rms_norm_eps", layout.rms_norm_eps)),
            tie_word_embeddings=layout.tie_word_embeddings)
    except ConfigError as e:
        raise CheckpointError(f"hybrid_config.json: {e}") from None


def zebra_tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of `cfg`'s reference-format checkpoint, keyed by the reference's name."""
    out = {}
    for name, s in tensor_specs(cfg).items():
        ref = reference_name(name)
        out[ref] = TensorSpec(ref, s.path, s.layer, s.hf_shape, s.shape, s.transpose)
    return out


def load_zebra(path: str | os.PathLike, dtype: str = "float32", overrides=()) -> Checkpoint:
    """Load a reference-format directory (config.json + hybrid_config.json + safetensors)."""
    from jaxllama.checkpoint.hf import load_tokenizer, read_json
    from jaxllama.checkpoint.hf_config import generation_from_hf
    path = Path(path)
    layout = read_layout(path)
    cfg = with_dtype(with_overrides(model_config(layout), overrides), dtype)
    tensors = ZebraTensors(path)
    try:
        files = {n: str(tensors._files[n]) for n in tensors}
        src = TensorSource(files, tensors.shape, tensors.__getitem__, str(path))
        ignore = ["lm_head.weight"] if cfg.tie_word_embeddings else []
        params = assemble_params(cfg, src, dtype, ignore=ignore, desc=f"loading {path.name}",
                                 specs=zebra_tensor_specs(cfg))
    finally:
        tensors.close()
    tokenizer = load_tokenizer(path)
    gen_file = path / "generation_config.json"
    gen = read_json(gen_file) if gen_file.is_file() else {}
    return Checkpoint(cfg, params, tokenizer, generation_from_hf(gen, layout.llama, tokenizer),
                      str(path))


def export_zebra(cfg: ModelConfig, params: dict) -> Iterable[tuple[str, np.ndarray]]:
    """(reference name, array) of every tensor, for `write_zebra(out, layout, ...)`."""
    return export_tensors(cfg, params, zebra_tensor_specs(cfg))


def save_zebra(layout: ZebraLayout, cfg: ModelConfig, params: dict, out_dir, **kw) -> str:
    """Write `params` of `cfg` in the reference format described by `layout`."""
    return write_zebra(out_dir, layout, export_zebra(cfg, params), **kw)


__all__ = ["NAME_MAP", "export_zebra", "load_zebra", "model_config", "reference_name",
           "save_zebra", "zebra_tensor_specs"]
