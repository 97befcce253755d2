"""DeepSeek-V2/V3 directories (dense MLPs) load, match transformers and export back.

Three tiny float32 random models, each built once and shared by the tests (module fixture):
  - v3-qlora-yarn: DeepseekV3, q_lora_rank, yarn with mscale and mscale_all_dim (the softmax
    scale carries mscale^2), interleaved RoPE;
  - v2-direct-default: DeepseekV2 (complex-number RoPE), a direct q_proj, default RoPE;
  - v3-direct-rotatehalf-yarn: DeepseekV3, a direct q_proj, rope_interleave false, yarn without
    mscale_all_dim (mscale multiplies cos and sin, no softmax correction: Zebra-Llama's
    convention).
Checked: logits to 1e-4; jaxllama's greedy tokens (prefill + cached absorbed decode through
`Engine`) == transformers' greedy `generate`; the export loads in transformers with the same
logits; MoE configs are a one-line error naming `first_k_dense_replace`.
"""

import json

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

from jaxllama.checkpoint import load_checkpoint
from jaxllama.checkpoint.base import CheckpointError
from jaxllama.checkpoint.hf import save_hf
from jaxllama.inference.engine import Engine

from .tiny_llama import hf_logits, our_logits, random_ids

COMMON = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "first_k_dense_replace": 2, "kv_lora_rank": 12, "qk_nope_head_dim": 8,
          "qk_rope_head_dim": 4, "v_head_dim": 6, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": None, "pad_token_id": 0}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.8}
CASES = {
    "v3-qlora-yarn": (DeepseekV3Config, DeepseekV3ForCausalLM,
                      {"num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 16,
                       "rope_parameters": YARN, "num_nextn_predict_layers": 0}),
    "v2-direct-default": (DeepseekV2Config, DeepseekV2ForCausalLM,
                          {"num_attention_heads": 4, "num_key_value_heads": 4,
                           "q_lora_rank": None,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
    "v3-direct-rotatehalf-yarn": (DeepseekV3Config, DeepseekV3ForCausalLM,
                                  {"num_attention_heads": 4, "num_key_value_heads": 4,
                                   "q_lora_rank": None, "rope_interleave": False,
                                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                                                       "factor": 8.0,
                                                       "original_max_position_embeddings": 8},
                                   "num_nextn_predict_layers": 0}),
}
PROMPT, NEW = 6, 8


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, the transformers model, its directory, our checkpoint)."""
    config_cls, model_cls, kw = CASES[request.param]
    torch.manual_seed(len(request.param))
    model = model_cls(config_cls(**COMMON, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(path)
    return request.param, model, path, load_checkpoint(path)


def test_config_is_read(case):
    name, _, _, ckpt = case
    cfg = ckpt.config
    assert set(cfg.layer_pattern) == {"mla"} and cfg.num_layers == 2
    m = cfg.mla
    assert (m.q_lora_rank is None) == ("direct" in name)
    assert m.num_kv_heads is None and m.num_heads == 4
    assert m.rope_interleave == ("rotatehalf" not in name)
    assert m.rope.type == ("yarn" if "yarn" in name else "default")


def test_logits_match_transformers(case):
    name, model, _, ckpt = case
    ids = random_ids(len(name), 2, 12, 64)
    ref = hf_logits(model, ids)
    ours = our_logits(ckpt.config, ckpt.params, ids)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)


def test_greedy_tokens_match_transformers_generate(case):
    """Prefill then one-token absorbed decode steps (the engine's decode weights) against
    transformers' cached greedy generation."""
    name, model, _, ckpt = case
    ids = random_ids(len(name) + 1, 2, PROMPT, 64)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=int),
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             pad_token_id=0)[:, PROMPT:].numpy()
    engine = Engine(ckpt.config, ckpt.params, prefill_chunk=8)
    out = engine.generate([list(r) for r in ids], max_new_tokens=NEW)
    assert any("absorbed" in k for k in jax_tree_keys(engine.decode_weights()))
    np.testing.assert_array_equal(out.tokens, ref)


def jax_tree_keys(tree) -> list:
    import jax

    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_export_loads_in_transformers_with_the_same_logits(case, tmp_path):
    name, model, _, ckpt = case
    out = save_hf(ckpt.config, ckpt.params, None, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v3"
    assert raw["first_k_dense_replace"] == raw["num_hidden_layers"] == 2
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(len(name) + 2, 2, 10, 64)
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(model, ids), rtol=1e-5,
                               atol=1e-5)


def test_gqa_width_kv_b_is_refused_both_ways(tmp_path):
    """transformers sizes kv_b_proj by the query heads: a config saying otherwise, and a
    Zebra-shaped (GQA-width kv_b) model, are one-line errors, nothing written."""
    raw = {"model_type": "deepseek_v3", **COMMON, "num_attention_heads": 4,
           "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="num_key_value_heads 2 != num_attention_heads 4"):
        load_checkpoint(tmp_path)
    from jaxllama.checkpoint.deepseek import config_to_hf
    from jaxllama.config import MLAConfig, ModelConfig
    zebra = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                        layer_pattern=("mla",), mla=MLAConfig(num_heads=4, num_kv_heads=2))
    with pytest.raises(CheckpointError, match="mla.num_kv_heads: 2"):
        config_to_hf(zebra)


def test_moe_layers_are_a_one_line_error(tmp_path):
    raw = {"model_type": "deepseek_v3", **COMMON, "num_attention_heads": 4,
           "first_k_dense_replace": 1}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"first_k_dense_replace 1 < num_hidden_layers 2"
                       r": MoE layers are not supported") as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)
