"""LongLLaMA checkpoints (`model_type: longllama`): config in and out, export round trip, the
convert CLI, and the two presets' exact parameter counts (jax.eval_shape: nothing allocated)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllama import from_pretrained
from jaxllama.checkpoint import CheckpointError, load_checkpoint, save_hf
from jaxllama.checkpoint.hf_config import config_from_hf, config_to_hf
from jaxllama.config import load_model_config
from jaxllama.model import init_params, unstack

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "longllama-tiny"


def llama_count(vocab, hidden, inter, layers):
    """Untied Llama with multi-head attention: embed + lm_head (2 V D), per layer q, k, v, o
    (4 D^2), gate, up, down (3 D F) and two norms (2 D), plus the final norm (D)."""
    return 2 * vocab * hidden + layers * (4 * hidden**2 + 3 * hidden * inter + 2 * hidden) + hidden


@pytest.mark.parametrize("name, mem, expected", [
    # OpenLLaMA-3B: V 32000, D 3200, F 8640, 26 layers: 204,800,000 embeddings + 26 x 123,910,400
    # + 3,200 = 3,426,473,600
    ("longllama-3b-v1.1", (6, 12, 18), 3_426_473_600),
    # CodeLlama-7B: V 32016, D 4096, F 11008, 32 layers: 262,275,072 embeddings + 32 x 202,383,360
    # + 4,096 = 6,738,546,688
    ("longllama-code-7b", (8, 16, 24), 6_738_546_688),
])
def test_preset_shapes_and_parameter_count(name, mem, expected):
    cfg = load_model_config(ROOT / "configs" / "models" / f"{name}.yaml")
    assert tuple(i for i, k in enumerate(cfg.layer_pattern) if k == "fot") == mem
    assert set(cfg.layer_pattern) == {"fot", "fot_local"}
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == expected == llama_count(cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
                                        cfg.num_layers)


def test_config_out_is_the_format_read():
    """Every key `LongLlamaConfig.save_pretrained` wrote comes back with its value."""
    raw = json.loads((FIXTURE / "config.json").read_text())
    out = config_to_hf(config_from_hf(raw, "config.json"), {"eos_token_ids": [2],
                                                            "bos_token_id": 1, "pad_token_id": 0})
    assert "num_key_value_heads" not in out
    assert {k: out.get(k) for k in raw if k != "transformers_version"} == {
        k: v for k, v in raw.items() if k != "transformers_version"}


def test_export_round_trip(tmp_path):
    ck = load_checkpoint(str(FIXTURE))
    out = save_hf(ck.config, ck.params, None, tmp_path / "out", ck.generation_config)
    again = from_pretrained(out)
    assert again.config == ck.config
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(ck.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.loads((Path(out) / "config.json").read_text())["model_type"] == "longllama"


def test_convert_cli_reads_and_writes_longllama(tmp_path):
    out = tmp_path / "conv"
    r = subprocess.run([sys.executable, "-m", "jaxllama.convert", "--input", str(FIXTURE),
                        "--output", str(out), "--to", "hf"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    raw = json.loads((out / "config.json").read_text())
    assert raw["mem_layers"] == [1, 3] and raw["architectures"] == ["LongLlamaForCausalLM"]


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 2}, r"num_key_value_heads 2 differs from num_attention_heads 4"),
    ({"mem_layers": [4]}, r"mem_layers must be a list of layer indices in 0\.\.3"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling must be null"),
    ({"mem_dtype": "int8"}, r"fot\.mem_dtype: 'int8' is not one of"),
])
def test_bad_configs_are_one_line_errors(change, message):
    raw = {**json.loads((FIXTURE / "config.json").read_text()), **change}
    with pytest.raises(CheckpointError, match=r"^config\.json: " + message):
        config_from_hf(raw, "config.json")


def test_export_refuses_a_layer_of_another_kind():
    cfg = config_from_hf(json.loads((FIXTURE / "config.json").read_text()), "config.json")
    cfg = cfg.replace(layer_pattern=("dense",) + cfg.layer_pattern[1:])
    with pytest.raises(CheckpointError, match=r"LongLLaMA export: layer 0 is a dense layer"):
        config_to_hf(cfg)


def test_any_llama_becomes_fot_by_override():
    """A Llama checkpoint with `model.layer_pattern=...` of FoT kinds: the same weights, and a
    `fot` section built from the trained context when none is given."""
    llama = ROOT / "tests" / "fixtures" / "lm-infinite-tiny"
    dense = load_checkpoint(str(llama))
    fot = load_checkpoint(str(llama), overrides=["model.layer_pattern=fot_local,fot,fot_local"])
    assert fot.config.layer_pattern == ("fot_local", "fot", "fot_local")
    assert fot.config.fot.last_context_length == dense.config.max_position_embeddings // 2
    layers = zip(unstack(fot.config, fot.params), unstack(dense.config, dense.params), strict=True)
    for got, want in [*layers, (fot.params["embed"], dense.params["embed"])]:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
