"""The Zebra-Llama presets (configs/models/zebra-llama-*.yaml): each builds (jax.eval_shape, no
memory) with its exact parameter count, is the model `convert hybridize --preset` makes from its
base preset, and the cache planner CLI prints its published KV-cache share against the base.

The counts are summed by hand from the published dims (below), and checked a second way against
the reference format's own tensor table (`ZebraLayout.tensor_shapes`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllama.checkpoint.hf_config import config_to_hf
from jaxllama.checkpoint.zebra_model import model_config
from jaxllama.config import load_model_config
from jaxllama.hybridize import HybridPlan, layout_for, read_preset
from jaxllama.kvcache import main
from jaxllama.model import init_params

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"


def _mla(d, n, k, q, r, nope, rope, v):
    """q_a, q_b, kv_a (latent + the shared rope key), kv_b at GQA width, out_proj."""
    return d * q + q * n * (nope + rope) + d * (r + rope) + r * k * (nope + v) + n * v * d


def _mamba2(d, n, k, h):
    """in_proj [z | x | B | C | dt], conv + bias over [x | B | C], dt_bias, A_log, D, norm,
    out_proj; d_inner = n * h = d, x and B at GQA width k * h, one SSM head per attention head."""
    e, xb = n * h, k * h
    conv = e + 2 * xb
    return d * (2 * e + 2 * xb + n) + conv * 4 + conv + 3 * n + e + e * d


def _total(vocab, d, f, layers, n_mla, mla, mamba2, tied):
    per_layer = 3 * d * f + 2 * d  # MLP and the two norms
    return (vocab * d * (1 if tied else 2) + layers * per_layer + n_mla * mla
            + (layers - n_mla) * mamba2 + d)


# name -> (base preset, parameter count, published KV share in percent)
ZEBRA = {
    "zebra-llama-1b-8mla-8m2": (
        "llama3.2-1b", _total(128256, 2048, 8192, 16, 8, _mla(2048, 32, 8, 1344, 128, 32, 32, 64),
                              _mamba2(2048, 32, 8, 64), tied=True), "7.81%"),
    "zebra-llama-3b-14mla-14m2": (
        "llama3.2-3b", _total(128256, 3072, 8192, 28, 14,
                              _mla(3072, 24, 8, 1536, 128, 64, 64, 128),
                              _mamba2(3072, 24, 8, 128), tied=True), "4.69%"),
    "zebra-llama-8b-8mla-24m2": (
        "llama3.1-8b", _total(128256, 4096, 14336, 32, 8,
                              _mla(4096, 32, 8, 2048, 160, 64, 64, 128),
                              _mamba2(4096, 32, 8, 128), tied=False), "2.73%"),
}
COUNTS = {"zebra-llama-1b-8mla-8m2": 1_267_149_568, "zebra-llama-3b-14mla-14m2": 3_269_234_672,
          "zebra-llama-8b-8mla-24m2": 8_379_095_296}


def _layout(name):
    base = load_model_config(MODELS / f"{ZEBRA[name][0]}.yaml")
    plan = read_preset(name)
    plan = HybridPlan(**{**plan, "mla_layers": tuple(plan["mla_layers"])})
    return layout_for(base, plan, config_to_hf(base))


@pytest.mark.parametrize("name", list(ZEBRA))
def test_preset_shapes_counts_and_hybridize_layout(name):
    cfg = load_model_config(MODELS / f"{name}.yaml")
    assert ZEBRA[name][1] == COUNTS[name]  # the hand sum above, written out
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == COUNTS[name]
    layout = _layout(name)
    assert sum(int(np.prod(s)) for s in layout.tensor_shapes().values()) == COUNTS[name]
    # the preset is exactly the model that `convert hybridize --preset` writes and loads
    assert model_config(layout) == cfg
    assert cfg.layer_pattern.count("mla") == len(layout.mla_layers)


@pytest.mark.parametrize("name", list(ZEBRA))
def test_kvcache_cli_prints_the_published_share(name, capsys):
    base = MODELS / f"{ZEBRA[name][0]}.yaml"
    assert main(["--config", str(MODELS / f"{name}.yaml"), "--seq-len", "16384",
                 "--baseline", str(base)]) == 0
    out = capsys.readouterr().out
    kv_line = [ln for ln in out.splitlines() if "keys/values" in ln and "baseline" in ln]
    assert len(kv_line) == 1 and kv_line[0].endswith(f"this model's are {ZEBRA[name][2]} of them"
                                                     ), out
    assert "recurrent state" in out  # the Mamba2 layers' constant state is reported apart
