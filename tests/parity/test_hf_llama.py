"""Loaded HF Llama directories give transformers' logits (float32, max abs diff <= 1e-4).

The cases cover every RoPE type (dynamic and longrope past their original length so the scaling is
live), GQA ratios 1, 2, 3 and 4, tied and untied embeddings, attention biases, an explicit head_dim,
both config.json forms (and the old `type` key), and sharded bfloat16 safetensors. transformers
loads every directory itself, so each config form is read by both sides.
"""

import numpy as np
import pytest
import torch

from jaxllama.checkpoint import load_checkpoint

from .tiny_llama import hf_logits, our_logits, random_ids, save_model, tiny_model

_LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 16,
             "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
             "long_factor": [1.0, 1.5, 2.2, 3.0, 4.1, 5.3, 6.8, 8.0]}

# id: (model kwargs, config form, sequence length, save kwargs)
CASES = {
    "default-gqa1-bias-v5": ({"heads": 4, "kv": 4, "bias": True}, "5.x", 20, {}),
    "linear-gqa3-tied-oldtype": ({"heads": 6, "kv": 2, "tie": True,
                                  "rope": {"rope_type": "linear", "factor": 2.0}},
                                 "4.x-type", 20, {}),
    "dynamic-gqa4-past-max-v4": ({"heads": 8, "kv": 2, "max_pos": 16,
                                  "rope": {"rope_type": "dynamic", "factor": 2.0}},
                                 "4.x", 28, {}),
    "yarn-gqa2-tied-v5": ({"heads": 4, "kv": 2, "tie": True, "rope": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
        "5.x", 24, {}),
    "longrope-gqa3-long-v4": ({"heads": 6, "kv": 2, "rope": _LONGROPE}, "4.x", 24, {}),
    "longrope-gqa3-short-v5": ({"heads": 6, "kv": 2, "rope": _LONGROPE}, "5.x", 12, {}),
    "llama3-gqa4-tied-v4": ({"heads": 8, "kv": 2, "tie": True, "rope": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}, "4.x", 20, {}),
    "default-bf16-sharded": ({"heads": 4, "kv": 2, "layers": 3}, "5.x", 20,
                             {"dtype": torch.bfloat16, "max_shard_size": "40KB"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    model_kw, form, length, save_kw = CASES[case]
    model = tiny_model(seed=len(case), **model_kw)
    path = save_model(model, tmp_path / "hf", form, **save_kw)
    if "max_shard_size" in save_kw:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*.safetensors"))) > 1
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    assert cfg.attention.num_heads // cfg.attention.num_kv_heads == (
        model_kw["heads"] // model_kw["kv"])
    assert cfg.tie_word_embeddings == model_kw.get("tie", False)
    rope_type = (model_kw.get("rope") or {}).get("rope_type", "default")
    assert cfg.attention.rope.type == rope_type
    ids = random_ids(len(case), 2, length, cfg.vocab_size)
    ref = hf_logits(path, ids)  # transformers reads the same directory (bf16 weights upcast)
    ours = our_logits(cfg, ckpt.params, ids)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # logits large enough for a wrong weight to show
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
    model = tiny_model(seed=3)
    path = save_model(model, tmp_path / "hf", dtype=torch.bfloat16)
    ckpt = load_checkpoint(path, dtype="bfloat16")
    assert ckpt.config.param_dtype == "bfloat16"
    emb = ckpt.params["embed"]["embedding"]
    assert emb.dtype == np.dtype("bfloat16") or str(emb.dtype) == "bfloat16"
    want = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(emb, np.float32), want)


def test_generation_config_eos_list(tmp_path):
    path = save_model(tiny_model(seed=4), tmp_path / "hf")
    gen = load_checkpoint(path).generation_config
    assert gen["eos_token_ids"] == [2, 3] and gen["bos_token_id"] == 1 and gen["pad_token_id"] == 0
