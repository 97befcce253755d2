import re
from pathlib import Path

import pytest

from jaxllama.config import (
    KIND_FIELDS,
    LAYER_KINDS,
    AttentionConfig,
    ConfigError,
    KernelConfig,
    LambdaConfig,
    ModelConfig,
    load_model_config,
    model_config_from_dict,
    parse_layer_pattern,
    to_dict,
)
from jaxllama.mixers import spec_of

ROOT = Path(__file__).parent.parent


def test_layer_pattern_forms():
    assert parse_layer_pattern("dense", 3) == ("dense",) * 3
    assert parse_layer_pattern("dense*2,lambda*3", None) == ("dense",) * 2 + ("lambda",) * 3
    assert parse_layer_pattern({"default": "lambda", "dense": [0, 3]}, 4) == (
        "dense", "lambda", "lambda", "dense")
    with pytest.raises(ConfigError, match=r"layer_pattern\.dense"):
        parse_layer_pattern({"default": "lambda", "dense": [9]}, 4)


def test_runs_group_consecutive_kinds():
    cfg = ModelConfig(layer_pattern=("dense", "lambda", "lambda", "dense"),
                      lambda_=LambdaConfig())
    assert cfg.runs == (("dense", 1), ("lambda", 2), ("dense", 1))


def test_unknown_key_and_bad_type_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.attention\.num_headz: unknown key"):
        model_config_from_dict({"attention": {"num_headz": 4}})
    with pytest.raises(ConfigError, match=r"model\.hidden_size: expected an integer"):
        model_config_from_dict({"hidden_size": "big"})
    with pytest.raises(ConfigError, match=r"num_kv_heads"):
        model_config_from_dict({"attention": {"num_heads": 4, "num_kv_heads": 3}})


def test_preset_file_errors_name_the_file(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("model:\n  hidden_sise: 3\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: model\.hidden_sise: unknown key"):
        load_model_config(p)
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: not valid YAML"):
        load_model_config(p)


# ----------------------------------------------------------------------------- earlier files

LEGACY = Path(__file__).parent / "fixtures" / "legacy_configs"


def test_preset_written_before_the_context_length_moved_loads_the_same():
    """configs/models/cbhybrid-l-8b.yaml as it was (context length under `attention`) gives the
    config the current preset gives."""
    old = load_model_config(LEGACY / "cbhybrid-l-8b.yaml")
    assert old == load_model_config(ROOT / "configs" / "models" / "cbhybrid-l-8b.yaml")
    assert old.max_position_embeddings == 131072 and old.attention.head_dim == 128


def test_orbax_model_yaml_written_by_the_previous_code_loads():
    """A `model.yaml` that `save_orbax` wrote before this change (attention.hidden_size and
    attention.max_position_embeddings, head_dim filled in) loads, and saves back in the new form."""
    cfg = load_model_config(LEGACY / "orbax_model.yaml")
    assert cfg.layer_pattern == ("dense", "lambda", "lambda")
    assert cfg.max_position_embeddings == 96 and cfg.hidden_size == 32
    assert (cfg.attention.num_heads, cfg.attention.num_kv_heads, cfg.attention.head_dim) == (4, 2, 8)
    assert cfg.attention.rope.type == "yarn" and cfg.lambda_.window == 8
    data = to_dict(cfg)
    assert "max_position_embeddings" not in data["attention"] and "hidden_size" not in data["attention"]
    assert model_config_from_dict(data) == cfg


def test_legacy_keys_that_disagree_name_both_places():
    with pytest.raises(ConfigError, match=r"model\.attention\.max_position_embeddings: 64 differs "
                                          r"from model\.max_position_embeddings 128"):
        model_config_from_dict({"max_position_embeddings": 128,
                                "attention": {"max_position_embeddings": 64}})
    with pytest.raises(ConfigError, match=r"model\.attention\.hidden_size: 48 differs"):
        model_config_from_dict({"hidden_size": 32, "attention": {"hidden_size": 48}})


# ----------------------------------------------------------------------------- kinds and specs


def test_sub_configs_are_built_from_the_model_not_copied():
    cfg = ModelConfig(hidden_size=48, max_position_embeddings=300, layer_pattern=("dense", "lambda"),
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                      lambda_=LambdaConfig(global_tokens=2, window=8))
    dense, lam = (spec_of(k).config(cfg) for k in ("dense", "lambda"))
    assert dense.attention is cfg.attention and lam.attention is cfg.attention
    assert lam.lambda_ is cfg.lambda_
    assert dense.head_dim == lam.head_dim == 12 and lam.context_length == 300
    assert cfg.attention.head_dim == 0  # nothing was written back into the knobs


def test_only_the_config_table_and_the_mixers_name_layer_kinds():
    """Outside jaxllama/mixers/, a kind name appears only in config.py's kind table, the
    LayerKind literal and DEFAULT_KIND."""
    allowed = {"LayerKind = Literal[", "DEFAULT_KIND: LayerKind =", "KIND_FIELDS: dict[str, str | None] ="}
    pattern = re.compile(r"""['"](dense|lambda)['"]""")
    hits = []
    for path in sorted((ROOT / "jaxllama").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("jaxllama", "mixers") or rel.parts[:2] == ("jaxllama", "kernels"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not any(line.startswith(a) for a in allowed):
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert hits == []


def test_unknown_and_unbuilt_kinds_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"layer_pattern\[1\]: 'densse' is not one of"):
        ModelConfig(layer_pattern=("dense", "densse"))
    unbuilt = [k for k in LAYER_KINDS if k not in KIND_FIELDS]
    if unbuilt:  # a kind of the LayerKind literal that no mixer registers yet
        with pytest.raises(ConfigError, match=rf"layer_pattern\[0\]: layer kind '{unbuilt[0]}' "
                                              "is not available"):
            ModelConfig(layer_pattern=(unbuilt[0],))
    with pytest.raises(ConfigError, match=r"layer kind 'rwkv' is not registered"):
        spec_of("rwkv")


def test_context_parallel_with_a_kind_that_cannot_is_a_config_error(monkeypatch):
    """Refused when the config is built (nothing traced), here for a lambda spec that lists no
    context-parallel mode; the real lambda spec runs both (halo exchange)."""
    import dataclasses

    from jaxllama.mixers import REGISTRY

    ok = ModelConfig(layer_pattern=("dense", "lambda"), lambda_=LambdaConfig(),
                     kernels=KernelConfig(context_parallel="ring"))
    assert all("ring" in spec_of(k).context_parallel for k in ok.layer_pattern)
    monkeypatch.setitem(REGISTRY, "lambda",
                        dataclasses.replace(REGISTRY["lambda"], context_parallel=()))
    with pytest.raises(ConfigError, match=r"kernels\.context_parallel: 'ring' is not supported by "
                                          r"lambda layers \(layer 1; lambda supports: none\)"):
        ModelConfig(layer_pattern=("dense", "lambda"), lambda_=LambdaConfig(),
                    kernels=KernelConfig(context_parallel="ring"))
    with pytest.raises(ConfigError, match=r"^model\.kernels\.context_parallel: 'allgather'"):
        model_config_from_dict({"layer_pattern": "lambda", "num_layers": 2, "lambda": {},
                                "kernels": {"context_parallel": "allgather"}})


def test_the_trainer_takes_context_parallelism_from_the_resolved_model(tmp_path):
    """The preset sets `kernels.context_parallel: ring` and the train YAML's `model` says nothing:
    the zigzag layout (seq_len divisible by 2 x mesh.seq) is still required, because the check
    reads the resolved ModelConfig, not the train YAML's raw `model` mapping."""
    from jaxllama.training.config import load_train_config
    from jaxllama.training.recipe import validate_train_config

    preset = tmp_path / "m.yaml"
    preset.write_text("model: {vocab_size: 64, hidden_size: 16, intermediate_size: 32, "
                      "num_layers: 1, attention: {num_heads: 2, num_kv_heads: 1}, "
                      "kernels: {context_parallel: ring}}\n")
    train = tmp_path / "t.yaml"
    train.write_text(f"model_preset: {preset}\nmesh: {{data: 2, fsdp: 1, tensor: 1, seq: 4}}\n"
                     "train: {seq_len: 4, batch_size: 2, steps: 1}\n")
    cfg = load_train_config(train)
    assert "kernels" not in cfg.model
    with pytest.raises(ConfigError, match=r"train\.seq_len: 4 is not divisible by 8 \(2 x mesh"):
        validate_train_config(cfg, 8)
