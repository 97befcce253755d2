"""RoPE frequencies from a translated HF config equal transformers' `ROPE_INIT_FUNCTIONS`.

For every type (and the yarn variants with mscale, an explicit attention_factor, no truncation), the
`inv_freq` and `attention_factor` of `rope_frequencies(rope_from_hf(config.json))` must equal what
the installed transformers computes, at the original length and past it (dynamic, longrope).
"""

import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from jaxllama.checkpoint.hf_config import config_from_hf, rope_from_hf
from jaxllama.layers.rope import rope_frequencies

HEAD_DIM, MAX_POS = 64, 4096
_rng = np.random.default_rng(0)
_SHORT = sorted(_rng.uniform(1.0, 2.0, HEAD_DIM // 2).round(4).tolist())
_LONG = sorted(_rng.uniform(1.0, 16.0, HEAD_DIM // 2).round(4).tolist())

ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512},
    "yarn-mscale": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn-attention-factor-untruncated": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
        "attention_factor": 1.3, "truncate": False},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 1024,
                 "short_factor": _SHORT, "long_factor": _LONG},
    "longrope-factor": {"rope_type": "longrope", "original_max_position_embeddings": 1024,
                        "factor": 2.0, "short_factor": _SHORT, "long_factor": _LONG},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
}


def hf_config(rope: dict, theta: float = 50000.0) -> LlamaConfig:
    return LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                       max_position_embeddings=MAX_POS,
                       rope_parameters={"rope_theta": theta, **rope})


# Only dynamic and longrope depend on the length: 2000 is past longrope's 1024, 9000 past MAX_POS.
LENGTHS = [(n, None) for n in ROPES] + [
    (n, s) for n in ROPES if n.startswith(("dynamic", "longrope")) for s in (2000, 9000)]


@pytest.mark.parametrize(("name", "seq_len"), LENGTHS)
def test_inv_freq_and_attention_factor(name, seq_len):
    hf = hf_config(ROPES[name])
    rope_type = ROPES[name]["rope_type"]
    if rope_type == "default":
        emb = LlamaRotaryEmbedding(hf)
        want, want_af = emb.inv_freq.numpy(), emb.attention_scaling
    else:
        want, want_af = ROPE_INIT_FUNCTIONS[rope_type](hf, None, seq_len=seq_len)
        want = want.numpy()
    raw = hf.to_dict()
    cfg = config_from_hf(raw, "config.json")
    got, got_af = rope_frequencies(cfg.attention.rope, cfg.attention.head_dim,
                                   cfg.max_position_embeddings, seq_len)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=0)
    assert float(got_af) == pytest.approx(float(want_af), rel=1e-6)


@pytest.mark.parametrize("name", [n for n in ROPES if n != "default"])
def test_config_forms_agree(name):
    """The 4.x form (`rope_scaling`, top-level `rope_theta`, `rope_type` or old `type`) and the 5.x
    form (`rope_parameters`) translate to the same RopeConfig."""
    rope = dict(ROPES[name])
    kind = rope.pop("rope_type")
    v5 = {"max_position_embeddings": MAX_POS,
          "rope_parameters": {"rope_type": kind, "rope_theta": 50000.0, **rope}}
    v4 = {"max_position_embeddings": MAX_POS, "rope_theta": 50000.0,
          "rope_scaling": {"rope_type": kind, **rope}}
    v4_old = {"max_position_embeddings": MAX_POS, "rope_theta": 50000.0,
              "rope_scaling": {"type": kind, **rope}}
    forms = [rope_from_hf(c, "config.json") for c in (v5, v4, v4_old)]
    assert forms[0] == forms[1] == forms[2]
    assert forms[0].type == kind and forms[0].theta == 50000.0


def test_unknown_rope_type_is_one_line_error():
    from jaxllama.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"config.json: rope type 'su' is not supported"):
        rope_from_hf({"rope_scaling": {"type": "su", "factor": 2.0}}, "config.json")
