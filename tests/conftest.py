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
# One persistent XLA compilation cache per run, shared by the pytest-xdist workers and the CLI
# subprocesses the tests start (all inherit this environment from the process that made it): a
# program compiled identically twice (on both workers, by a CLI run, or by a second Engine, whose
# jitted methods are new functions) is compiled once. A fresh directory per run, so no test runs a
# program compiled by an earlier run. The size limit turns on JAX's file lock around each read and
# write, so no process reads an entry another one is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxllama-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

# XLA:CPU with less LLVM optimisation and its older elemental emitters (the kernel tests'
# FAST_COMPILE) for every program, inherited by the workers and the CLI subprocesses: same
# semantics, and the suite is mostly compiling (a whole run on 2 cores: 1,863 s wall / 3,513 s CPU
# with XLA's defaults, 971 s / 1,741 s with these, every test passing both ways). Set
# JAXLLAMA_TEST_FAST_COMPILE=0 to run the suite with XLA's default (production) options.
if os.environ.get("JAXLLAMA_TEST_FAST_COMPILE", "1").strip() != "0":
    _user = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join([_user] + [
        f for f in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
        if f.split("=")[0] not in _user]).strip()

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
def smollm2_tokenizer(smollm2_gguf_path):
    """(tokenizer, generation config) of the embedded GGUF, as `smollm2_jax` holds them, without
    dequantizing its weights (for tests that only borrow the vocabulary)."""
    from pathlib import Path

    from jaxllama.checkpoint.gguf import generation_from_gguf, load_gguf_tokenizer, open_reader
    path = Path(smollm2_gguf_path)
    return load_gguf_tokenizer(path), generation_from_gguf(open_reader(path))


@pytest.fixture(scope="session")
def make_tiny_hf(smollm2_tokenizer, tmp_path_factory):
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
        tokenizer, generation_config = smollm2_tokenizer
        save_hf(cfg, params, tokenizer, out, generation_config)
        return str(out)

    return make


@pytest.fixture
def without_compile_cache():
    """This test compiles for real (no hit in the run's persistent compilation cache): for tests
    that read what compiling prints or how long it takes."""
    from jax.experimental.compilation_cache import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", was)
    compilation_cache.reset_cache()


# ----------------------------------------------------------------------------- xdist scheduling

# Session fixtures that load the real SmolLM2 (seconds to a minute each, once per process).
SMOLLM2_FIXTURES = frozenset({"smollm2_jax", "smollm2_hf"})


def _shares_a_fixture(item) -> bool:
    """The test uses a module-, class- or package-scoped fixture (one its neighbours reuse)."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else ()
    return any(d.scope in ("module", "class", "package") for ds in defs for d in ds)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """`xdist_group` marks for `--dist loadgroup` (pyproject addopts), which keeps a group on one
    worker: every module with a test that loads the real SmolLM2 is one group (one worker loads
    it, not both), and a module whose tests share a module-scoped fixture is its own group (the
    fixture is built once, not once per worker). Other tests are dealt out one at a time."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(str(item.path), []).append(item)
    for group in modules.values():
        if any(SMOLLM2_FIXTURES & set(getattr(i, "fixturenames", ())) for i in group):
            name = "smollm2"
        elif any(_shares_a_fixture(i) for i in group):
            name = group[0].nodeid.split("::")[0]
        else:
            continue
        for i in group:
            i.add_marker(pytest.mark.xdist_group(name))
