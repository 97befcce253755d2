"""Every model preset in configs/models builds (jax.eval_shape: no memory) with the known size."""

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllama.config import load_model_config
from jaxllama.model import init_params

PRESETS = sorted((Path(__file__).parent.parent / "configs" / "models").glob("*.yaml"))

# Published parameter counts (embeddings included; SmolLM2 ties its LM head).
KNOWN_COUNTS = {
    "smollm2-135m": 134_515_008,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_builds(path):
    cfg = load_model_config(path)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    n = count(shapes)
    assert n > 0
    if path.stem in KNOWN_COUNTS:
        assert n == KNOWN_COUNTS[path.stem]
    embed = shapes["embed"]["embedding"]
    assert embed.shape == (cfg.vocab_size, cfg.hidden_size)
    assert ("lm_head" in shapes) != cfg.tie_word_embeddings


def test_known_presets_exist():
    assert set(KNOWN_COUNTS) <= {p.stem for p in PRESETS}


def test_llama31_rope_scaling():
    cfg = load_model_config(PRESETS[0].parent / "llama3.1-8b.yaml")
    rope = cfg.attention.rope
    assert (rope.type, rope.factor, rope.low_freq_factor, rope.high_freq_factor) == (
        "llama3", 8.0, 1.0, 4.0)
    assert rope.original_max_position_embeddings == 8192
    assert cfg.max_position_embeddings == 131072 and rope.theta == 500000.0


def test_smollm2_preset_matches_embedded_gguf(smollm2_gguf_path):
    """The preset is the architecture the embedded GGUF's metadata describes."""
    from jaxllama.checkpoint.gguf import config_from_gguf, open_reader
    from_gguf = config_from_gguf(open_reader(Path(smollm2_gguf_path)), smollm2_gguf_path)
    preset = load_model_config(PRESETS[0].parent / "smollm2-135m.yaml")
    assert from_gguf.rms_norm_eps == pytest.approx(preset.rms_norm_eps, rel=1e-6)
    assert from_gguf.replace(rms_norm_eps=preset.rms_norm_eps) == preset


# config.json of the published Meta checkpoints (transformers 4.x form, as shipped).
_LLAMA3_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}
_LLAMA31_JSON = {
    **_LLAMA3_JSON, "max_position_embeddings": 131072, "mlp_bias": False,
    "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


@pytest.mark.parametrize(("name", "raw"), [("llama3-8b", _LLAMA3_JSON),
                                           ("llama3.1-8b", _LLAMA31_JSON)])
def test_presets_equal_published_config_json(name, raw):
    from jaxllama.checkpoint.hf_config import config_from_hf, config_to_hf
    preset = load_model_config(PRESETS[0].parent / f"{name}.yaml")
    assert config_from_hf(raw, "config.json") == preset
    back = config_to_hf(preset)
    assert config_from_hf(back, "exported config.json") == preset
    for key in ("rope_theta", "rope_scaling", "max_position_embeddings", "num_key_value_heads"):
        assert back[key] == raw[key], key


TRAIN_YAMLS = sorted((PRESETS[0].parent.parent / "train").glob("*.yaml"))
RECIPES = sorted((PRESETS[0].parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_YAMLS + RECIPES, ids=[p.stem for p in TRAIN_YAMLS + RECIPES])
def test_train_configs_and_recipes_load(path, monkeypatch):
    """Every train config and recipe in configs/ still validates (keys, types, the model mapping
    with its context length) without devices or data."""
    from jaxllama.training.config import load_train_config
    from jaxllama.training.recipe import load_recipe, stage_config

    monkeypatch.chdir(PRESETS[0].parent.parent.parent)  # recipes name their base relative to root
    if path.parent.name == "train":
        assert load_train_config(path).train.steps > 0
    else:
        recipe = load_recipe(path)
        seqs = [stage_config(recipe, i).model["max_position_embeddings"]
                for i in range(len(recipe.stages))]
        assert seqs == sorted(seqs) and seqs[-1] >= recipe.stages[-1].seq_len
