"""Engine defaults per platform name (a pure function: no device of that kind needed) and how an
`Engine` applies them and explicit options."""

import jax
import pytest

from jaxllama import AttentionConfig, ModelConfig
from jaxllama.inference.decode import DecodeLayout
from jaxllama.inference.engine import Engine, engine_defaults

CPU_LAYOUT = DecodeLayout(unstacked=True, separate_head=True)


@pytest.mark.parametrize("param_dtype,bf16_units,prefill", [
    ("float32", False, "float32"), ("float32", True, "float32"),
    ("bfloat16", False, "float32"), ("bfloat16", True, "bfloat16")])
def test_cpu_decodes_float32_from_an_unstacked_copy(param_dtype, bf16_units, prefill):
    d = engine_defaults("cpu", param_dtype, bf16_units)
    assert (d.prefill_dtype, d.decode_dtype, d.cache_dtype) == (prefill, "float32", "float32")
    assert d.layout == CPU_LAYOUT


@pytest.mark.parametrize("platform", ["gpu", "cuda", "rocm", "tpu", "TPU"])
@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_accelerators_use_params_in_place_in_the_compute_dtype(platform, param_dtype):
    for units in (False, True):  # CPU units never matter off CPU
        d = engine_defaults(platform, param_dtype, units)
        assert (d.prefill_dtype, d.decode_dtype, d.cache_dtype) == (param_dtype,) * 3
        assert d.layout == DecodeLayout(unstacked=False, separate_head=False)


def _cfg(param_dtype="bfloat16"):
    return ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, layer_pattern=("dense",),
                       max_position_embeddings=32,
                       attention=AttentionConfig(num_heads=2, num_kv_heads=1),
                       param_dtype=param_dtype)


def test_engine_applies_platform_defaults_and_options(monkeypatch):
    """Engine construction only (nothing compiles): the platform's defaults, then explicit
    options over them; on an accelerator the cache follows an explicit decode dtype."""
    import jaxllama.inference.engine as engine_mod

    monkeypatch.setattr(engine_mod, "cpu_has_bfloat16_units", lambda: True)
    params = {}
    gpu = Engine(_cfg(), params, platform="gpu")
    assert (gpu.prefill_cfg.dtype, gpu.decode_cfg.dtype) == ("bfloat16", "bfloat16")
    assert gpu.cache_dtype == jax.numpy.bfloat16 and gpu.layout == DecodeLayout()
    gpu32 = Engine(_cfg(), params, platform="cuda", decode_dtype="float32")
    assert gpu32.cache_dtype == jax.numpy.float32 and gpu32.prefill_cfg.dtype == "bfloat16"
    cpu = Engine(_cfg(), params, platform="cpu")
    assert (cpu.prefill_cfg.dtype, cpu.decode_cfg.dtype) == ("bfloat16", "float32")
    assert cpu.cache_dtype == jax.numpy.float32 and cpu.layout == CPU_LAYOUT
    mixed = Engine(_cfg(), params, platform="cpu", unstacked=False, cache_dtype="bfloat16")
    assert mixed.layout == DecodeLayout(unstacked=False, separate_head=True)
    assert mixed.cache_dtype == jax.numpy.bfloat16
    assert Engine(_cfg(), params).layout == (CPU_LAYOUT if jax.default_backend() == "cpu"
                                             else DecodeLayout())
