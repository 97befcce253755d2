"""Test-wide JAX setup: CPU, 8 simulated devices (for sharding tests), float32 matmuls exact."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


# ----------------------------------------------------------------------------- shared SmolLM2 loads

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF."""
    from jaxllama.checkpoint import default_checkpoint
    return default_checkpoint()


@pytest.fixture(scope="session")
def smollm2_jax(smollm2_gguf_path):
    """`load_checkpoint(None)` in float32 (config, params, tokenizer, generation_config)."""
    from jaxllama.checkpoint import load_checkpoint
    return load_checkpoint(None, "float32")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf_path):
    """(transformers model, tokenizer) loaded by transformers from the same GGUF, float32, eval."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(smollm2_gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer
