"""The rungs under the model-level parity test: RMSNorm, the attention layer and the decoder layer
against transformers' LlamaRMSNorm, LlamaAttention and LlamaDecoderLayer (STYLE section 6.3).

Each rung copies one random transformers layer's weights into ours by hand (HF [out, in] matrices
transposed, then split into heads), feeds both the same fresh random input at float32, and bounds
the relative error max|ours - theirs| / max|theirs| by 1e-5. transformers gets its own rotary
embeddings (`LlamaRotaryEmbedding` on the same positions) and an explicit additive causal mask, so
a wrong RoPE scaling, GQA grouping, softmax scale or residual order on our side shows here,
one layer at a time, before it shows in the logits of tests/parity/test_hf_llama.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxllama.block import Block
from jaxllama.checkpoint.hf_config import config_from_hf
from jaxllama.layers.basic import RMSNorm
from jaxllama.mixers import Attention, spec_of

from .tiny_llama import tiny_model

RTOL = 1e-5

# id: tiny_model kwargs. Every case has GQA (N/K > 1) and a RoPE whose scaling is live at the
# positions used (up to ~120, past each original length): yarn scales cos/sin by its attention
# factor, llama3 bends the low frequencies, dynamic rescales theta past max_position_embeddings.
CASES = {
    "yarn-gqa3-bias": {"heads": 6, "kv": 2, "bias": True, "rope": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    "llama3-gqa4": {"heads": 8, "kv": 2, "theta": 500000.0, "rope": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}},
    "dynamic-gqa2-past-max": {"heads": 4, "kv": 2, "max_pos": 32, "rope": {
        "rope_type": "dynamic", "factor": 2.0}},
}
BATCH, LENGTH = 2, 12


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_case(name: str):
    """A random float32 transformers model of case `name` (eager attention) and our config."""
    model = tiny_model(seed=len(name), layers=1, **CASES[name])
    model.config._attn_implementation = "eager"  # the plain softmax path, no SDPA kernel choice
    cfg = config_from_hf(model.config.to_dict(), f"case {name}")
    return model, cfg


def fresh_inputs(seed: int, hidden: int):
    """x [B T D] (std 1) and strictly increasing positions [B T] at random offsets."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, LENGTH, hidden)).astype(np.float32)
    steps = rng.integers(1, 10, (BATCH, LENGTH))
    positions = (np.cumsum(steps, axis=1) - steps[:, :1]
                 + rng.integers(0, 20, (BATCH, 1))).astype(np.int32)
    return x, positions


def hf_rope_and_mask(model, x, positions):
    """transformers' (cos, sin) for `positions` and the additive causal mask [B 1 T T]."""
    t = x.shape[1]
    cos_sin = model.model.rotary_emb(torch.tensor(x), torch.tensor(positions, dtype=torch.long))
    blocked = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    mask = torch.zeros(t, t).masked_fill(blocked, torch.finfo(torch.float32).min)
    return cos_sin, mask.expand(x.shape[0], 1, t, t)


def _t(p: torch.Tensor) -> np.ndarray:
    return p.detach().numpy().astype(np.float32)


def _matrix(lin: torch.nn.Linear, in_shape, out_shape) -> dict:
    """An HF Linear ([out, in] weight, [out] bias) as our Linear's [*in, *out] kernel and bias."""
    out = {"kernel": _t(lin.weight).T.reshape(*in_shape, *out_shape)}
    if lin.bias is not None:
        out["bias"] = _t(lin.bias).reshape(out_shape)
    return out


def attention_params(attn, cfg) -> dict:
    a = cfg.attention
    d, n, k, h = cfg.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim_for(cfg.hidden_size)
    return {"q_proj": _matrix(attn.q_proj, (d,), (n, h)),
            "k_proj": _matrix(attn.k_proj, (d,), (k, h)),
            "v_proj": _matrix(attn.v_proj, (d,), (k, h)),
            "o_proj": _matrix(attn.o_proj, (n, h), (d,))}


def block_params(layer, cfg) -> dict:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {"mixer_norm": {"scale": _t(layer.input_layernorm.weight)},
            "mixer": attention_params(layer.self_attn, cfg),
            "mlp_norm": {"scale": _t(layer.post_attention_layernorm.weight)},
            "mlp": {"gate": _matrix(layer.mlp.gate_proj, (d,), (f,)),
                    "up": _matrix(layer.mlp.up_proj, (d,), (f,)),
                    "down": _matrix(layer.mlp.down_proj, (f,), (d,))}}


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: rms^2 ~ 1e-6, so eps (1e-5) matters
def test_rms_norm_matches_transformers(scale):
    model, cfg = hf_case("yarn-gqa3-bias")
    norm = model.model.layers[0].input_layernorm
    assert norm.variance_epsilon == cfg.rms_norm_eps
    x, _ = fresh_inputs(7, cfg.hidden_size)
    x = x * scale
    with torch.no_grad():
        ref = norm(torch.tensor(x)).numpy()
    ours = RMSNorm(cfg.rms_norm_eps).apply({"params": {"scale": _t(norm.weight)}}, jnp.asarray(x))
    assert ours.dtype == jnp.float32
    assert rel_err(ours, ref) <= RTOL
    # the learned scale is not all ones, so a dropped weight would fail
    assert rel_err(ours, ref / _t(norm.weight)) > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_transformers(case):
    model, cfg = hf_case(case)
    attn = model.model.layers[0].self_attn
    a = cfg.attention
    assert a.num_heads // a.num_kv_heads == attn.num_key_value_groups > 1
    assert a.rope.type == CASES[case]["rope"]["rope_type"]
    x, positions = fresh_inputs(len(case), cfg.hidden_size)
    rope = CASES[case]["rope"]
    assert positions.max() + 1 > rope.get("original_max_position_embeddings",
                                          CASES[case].get("max_pos", 64))  # scaling is live
    cos_sin, mask = hf_rope_and_mask(model, x, positions)
    with torch.no_grad():
        ref, _ = attn(torch.tensor(x), position_embeddings=cos_sin, attention_mask=mask)
    ours, cache = jax.jit(lambda p, x, pos: Attention(cfg=spec_of("dense").config(cfg)).apply(
        {"params": p}, x, pos))(attention_params(attn, cfg), jnp.asarray(x), jnp.asarray(positions))
    assert cache is None and ours.dtype == jnp.float32
    assert rel_err(ours, ref.numpy()) <= RTOL


@pytest.mark.parametrize("case", list(CASES))
def test_decoder_layer_matches_transformers(case):
    model, cfg = hf_case(case)
    layer = model.model.layers[0]
    x, positions = fresh_inputs(100 + len(case), cfg.hidden_size)
    cos_sin, mask = hf_rope_and_mask(model, x, positions)
    with torch.no_grad():
        ref = layer(torch.tensor(x), attention_mask=mask, position_embeddings=cos_sin).numpy()
    ours, cache = jax.jit(lambda p, x, pos: Block(cfg, "dense").apply({"params": p}, x, pos))(
        block_params(layer, cfg), jnp.asarray(x), jnp.asarray(positions))
    assert cache is None
    # the residual stream alone is not a match: the layer's own contribution is large
    assert rel_err(x, ref) > 1e-2
    assert rel_err(ours, ref) <= RTOL
