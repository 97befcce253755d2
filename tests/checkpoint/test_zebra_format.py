"""`convert hybridize` and the Zebra-Llama reference format (tiny teacher of fixtures/zebra-tiny).

The CLI writes what `hybridize` computes, in files `read_zebra` reads back; bad flags are one
line with nothing written; `--ssm mamba` writes Mamba-in-the-Llama's Mamba1 tensors; the
published layouts give the published KV-cache shares with their base presets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxllama.checkpoint.hf_config import config_from_hf
from jaxllama.checkpoint.zebra import ZebraLayout, read_zebra
from jaxllama.config import load_model_config
from jaxllama.convert import main
from jaxllama.hybridize import LAYOUTS, hybridize, plan_from_layout, read_preset

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "tests" / "fixtures" / "zebra-tiny" / "teacher"
REFERENCE = ROOT / "tests" / "fixtures" / "zebra-tiny" / "hybrid"
TINY = ["--mla-layers", "0,2", "--q-lora-rank", "32", "--kv-lora-rank", "16",
        "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "8", "--seed", "3"]


@pytest.fixture(scope="module")
def teacher():
    raw = json.loads((TEACHER / "config.json").read_text())
    return raw, config_from_hf(raw, "config.json"), load_file(str(TEACHER / "model.safetensors"))


def test_cli_writes_what_hybridize_computes(tmp_path, teacher, capsys):
    out = tmp_path / "hybrid"
    assert main(["hybridize", "--input", str(TEACHER), "--output", str(out), *TINY]) == 0
    assert "wrote the hybrid" in capsys.readouterr().out
    layout, tensors = read_zebra(out)
    ref_layout, _ = read_zebra(REFERENCE)
    assert layout.hybrid_config() == ref_layout.hybrid_config()
    raw, cfg, t = teacher
    _, want = hybridize(t, cfg, plan_from_layout(ref_layout, seed=3), raw)
    assert set(tensors) == set(want)
    for name, a in want.items():
        np.testing.assert_array_equal(tensors[name], a, err_msg=name)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == raw["eos_token_id"]


def test_cli_bfloat16_output_and_a_preset_file(tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text("tiny:\n  mla_layers: [1]\n  q_lora_rank: 16\n  kv_lora_rank: 8\n"
                      "  qk_nope_head_dim: 8\n  qk_rope_head_dim: 8\n  rope_factor: 8.0\n")
    out = tmp_path / "h"
    assert main(["hybridize", "--input", str(TEACHER), "--output", str(out), "--preset",
                 str(preset), "--kv-lora-rank", "16", "--dtype", "bfloat16"]) == 0
    layout, tensors = read_zebra(out)
    assert layout.mla_layers == (1,) and layout.kv_lora_rank == 16  # the flag wins
    assert layout.q_lora_rank == 16 and layout.rope_scaling["factor"] == 8.0
    assert str(tensors["model.layers.1.mla.q_a_proj.weight"].dtype) == "bfloat16"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize(("flags", "code", "message"), [
    (["--mla-layers", "0,9", "--q-lora-rank", "32", "--kv-lora-rank", "16"], 1,
     "MLA layer 9 is outside 0..3"),
    (["--mla-layers", "0", "--q-lora-rank", "32", "--kv-lora-rank", "16",
      "--v-head-dim", "8"], 1, "needs v_head_dim == head_dim 16"),
    (["--mla-layers", "0", "--q-lora-rank", "32", "--kv-lora-rank", "16",
      "--qk-nope-head-dim", "12", "--qk-rope-head-dim", "8"], 1, "exceeds the head dim 16"),
    (["--mla-layers", "0", "--q-lora-rank", "32"], 2, "--kv-lora-rank is required"),
    (["--preset", "no-such-layout"], 1, "'no-such-layout' is not in"),
])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, code, message):
    out = tmp_path / "h"
    with pytest.raises(SystemExit) if code == 2 else _nothing() as exc:
        rc = main(["hybridize", "--input", str(TEACHER), "--output", str(out), *flags])
    rc = exc.value.code if code == 2 else rc
    err = capsys.readouterr().err.strip()
    assert rc == code and message in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_mamba1_variant_transfers_attention(tmp_path, teacher):
    out = tmp_path / "m1"
    assert main(["hybridize", "--input", str(TEACHER), "--output", str(out), "--mla-layers", "",
                 "--ssm", "mamba", "--mamba-d-state", "8", "--bf16-round", "off"]) == 0
    layout, tensors = read_zebra(out)
    assert layout.ssm_layer == "mamba" and layout.mla_layers == ()
    assert json.loads((out / "hybrid_config.json").read_text())["ssm_layer"] == "mamba"
    _, _, t = teacher
    for layer in range(4):
        pre, att = f"model.layers.{layer}.mamba.", f"model.layers.{layer}.self_attn."
        for ours, theirs in (("in_proj_x", "v_proj"), ("B_proj", "k_proj"),
                             ("C_proj", "q_proj"), ("out_proj", "o_proj")):
            np.testing.assert_array_equal(tensors[pre + ours + ".weight"],
                                          t[att + theirs + ".weight"])
        a = np.exp(tensors[pre + "A_log"])
        np.testing.assert_allclose(a, np.tile(np.arange(1, 9), (64, 1)), rtol=1e-6)
        assert tensors[pre + "conv1d.weight"].shape == (64, 1, 4)  # d_inner channels
        assert tensors[pre + "dt_proj.weight"].shape == (64, 4)  # dt_rank ceil(64 / 16)


def test_layout_rejects_unknown_keys_and_mismatched_tensors(tmp_path):
    raw = json.loads((REFERENCE / "hybrid_config.json").read_text())
    llama = json.loads((REFERENCE / "config.json").read_text())
    with pytest.raises(ValueError, match="hybrid_config.json: bogus: unknown key"):
        ZebraLayout.from_files({**raw, "bogus": 1}, llama)
    with pytest.raises(ValueError, match="n_layer 5 differs"):
        ZebraLayout.from_files({**raw, "n_layer": 5}, llama)
    layout = ZebraLayout.from_files(raw, llama)
    assert layout.kinds.count("mla") == len(raw["mla_layers"])
    shapes = layout.tensor_shapes()
    assert shapes["model.layers.1.mamba.in_proj.weight"] == (196, 64)  # README's row count


# The published KV-cache shares (issue 14): N_mla (r_kv + d_rope) / (N_layers 2 n_kv head_dim).
PUBLISHED_SHARES = {"zebra-llama-1b-8mla-8m2": 7.81, "zebra-llama-3b-14mla-14m2": 4.69,
                    "zebra-llama-8b-8mla-24m2": 2.73}


@pytest.mark.parametrize("name", list(PUBLISHED_SHARES))
def test_published_layouts_give_the_published_kv_shares(name):
    import yaml
    entry = yaml.safe_load(LAYOUTS.read_text())[name]
    base = load_model_config(ROOT / "configs" / "models" / f"{entry['base']}.yaml")
    plan = read_preset(name)
    h = base.attention.head_dim_for(base.hidden_size)
    assert plan["v_head_dim"] == h  # the SVD init's requirement
    assert plan["qk_nope_head_dim"] + plan["qk_rope_head_dim"] <= h
    assert all(0 <= i < base.num_layers for i in plan["mla_layers"])
    latent = len(plan["mla_layers"]) * (plan["kv_lora_rank"] + plan["qk_rope_head_dim"])
    dense = base.num_layers * 2 * base.attention.num_kv_heads * h
    assert round(100 * latent / dense, 2) == PUBLISHED_SHARES[name]
