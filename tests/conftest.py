"""Test-wide JAX setup: CPU, 8 simulated devices (for sharding tests), float32 matmuls exact."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the GGUF tokenizer cache goes to a per-run temporary directory, not ~/.cache/jaxllama
if "JAXLLAMA_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAXLLAMA_CACHE"] = tempfile.mkdtemp(prefix="jaxllama-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXLLAMA_CACHE"], ignore_errors=True)

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


# ----------------------------------------------------------------------------- shared SmolLM2 loads

import pytest


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


@pytest.fixture(scope="session")
def make_tiny_hf(smollm2_jax, tmp_path_factory):
    """Factory: a tiny random 2-layer dense Llama (SmolLM2's tokenizer and generation config) saved
    as a Hugging Face directory; returns its path as a string."""
    import jax

    from jaxllama import AttentionConfig, ModelConfig, init_params
    from jaxllama.checkpoint import save_hf

    def make(name: str, *, tie: bool, kv_heads: int, context: int, seed: int) -> str:
        cfg = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                          layer_pattern=("dense",) * 2, tie_word_embeddings=tie,
                          max_position_embeddings=context,
                          attention=AttentionConfig(num_heads=4, num_kv_heads=kv_heads))
        params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(seed))
        out = tmp_path_factory.mktemp(name) / "hf"
        save_hf(cfg, params, smollm2_jax.tokenizer, out, smollm2_jax.generation_config)
        return str(out)

    return make
