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
    assert cfg.attention.max_position_embeddings == 131072 and rope.theta == 500000.0


def test_smollm2_preset_matches_embedded_gguf(smollm2_gguf_path):
    """The preset is the architecture the embedded GGUF's metadata describes."""
    from jaxllama.checkpoint.gguf import config_from_gguf, open_reader
    from_gguf = config_from_gguf(open_reader(Path(smollm2_gguf_path)), smollm2_gguf_path)
    preset = load_model_config(PRESETS[0].parent / "smollm2-135m.yaml")
    assert from_gguf.rms_norm_eps == pytest.approx(preset.rms_norm_eps, rel=1e-6)
    assert from_gguf.replace(rms_norm_eps=preset.rms_norm_eps) == preset
