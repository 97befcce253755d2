import pytest

from jaxllama.config import (
    ConfigError,
    ModelConfig,
    load_model_config,
    model_config_from_dict,
    parse_layer_pattern,
)


def test_layer_pattern_forms():
    assert parse_layer_pattern("dense", 3) == ("dense",) * 3
    assert parse_layer_pattern("dense*2,lambda*3", None) == ("dense",) * 2 + ("lambda",) * 3
    assert parse_layer_pattern({"default": "lambda", "dense": [0, 3]}, 4) == (
        "dense", "lambda", "lambda", "dense")
    with pytest.raises(ConfigError, match=r"layer_pattern\.dense"):
        parse_layer_pattern({"default": "lambda", "dense": [9]}, 4)


def test_runs_group_consecutive_kinds():
    cfg = ModelConfig(layer_pattern=("dense", "lambda", "lambda", "dense"),
                      lambda_=__import__("jaxllama").LambdaConfig())
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
