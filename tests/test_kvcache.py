"""Cache planner: the published figures (METHODS 6), the sequence-growing / constant split, the
`--baseline` percent, agreement with the caches the model really allocates, the CBHybrid presets
under `jax.eval_shape`, and CLI errors."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxllama.config import (
    AttentionConfig,
    LambdaConfig,
    Mamba2Config,
    ModelConfig,
    load_model_config,
)
from jaxllama.kvcache import main, plan
from jaxllama.model import Transformer, init_cache

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "models"


def preset(name, overrides=()):
    return load_model_config(PRESETS / f"{name}.yaml", list(overrides))


def cache_bytes(tree):
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def kv_bytes(tree):
    """Bytes of the key/value leaves only (float leaves; ids and lengths are int32)."""
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)
               if jnp.issubdtype(a.dtype, jnp.floating))


def test_presets_layer_counts():
    m, big = preset("cbhybrid-m-8b"), preset("cbhybrid-l-8b")
    assert m.layer_pattern.count("lambda") == 28 and big.layer_pattern.count("lambda") == 25
    for cfg in (m, big):
        assert cfg.num_layers == 32 and cfg.layer_pattern[0] == "dense"
        assert (cfg.lambda_.window, cfg.lambda_.global_tokens) == (8192, 512)
        assert cfg.attention.rope.type == "llama3"
        assert cfg.max_position_embeddings == 131072
        assert (cfg.attention.num_kv_heads, cfg.attention.head_dim) == (8, 128)
    moved = preset("cbhybrid-m-8b", ["model.layer_pattern.dense=[0,1,30,31]"])
    assert [i for i, k in enumerate(moved.layer_pattern) if k == "dense"] == [0, 1, 30, 31]


def test_presets_share_llama31_geometry():
    base = preset("llama3.1-8b")
    for name in ("cbhybrid-m-8b", "cbhybrid-l-8b"):
        cfg = preset(name)
        assert cfg.replace(layer_pattern=base.layer_pattern, lambda_=None, dtype=base.dtype,
                           param_dtype=base.param_dtype) == base


def test_published_figures():
    llama = preset("llama3.1-8b")
    assert plan(llama, 16384, dtype="bfloat16").kv_bytes == 32 * 16384 * 4096 == 2_147_483_648
    assert plan(preset("cbhybrid-m-8b", ["model.layer_pattern=dense"]), 16384).kv_bytes == \
        2_147_483_648
    m = plan(preset("cbhybrid-m-8b"), 16384, memory_tokens=(256, 8))
    big = plan(preset("cbhybrid-l-8b"), 16384, memory_tokens=(256, 8))
    assert m.positions == 16896 and m.memory_tokens == 512
    # entries per layer at 4,096 key/value bytes each: dense 16,896 positions, lambda 8,192 + 512
    assert {k.kind: (k.layers, k.kv_bytes // k.layers) for k in m.kinds} == \
        {"dense": (4, 16896 * 4096), "lambda": (28, 8704 * 4096)}
    assert m.kv_bytes == (4 * 16896 + 28 * 8704) * 4096 == 1_275_068_416
    assert big.kv_bytes == (7 * 16896 + 25 * 8704) * 4096 == 1_375_731_712
    assert [round(p.kv_bytes / 1e9, 3) for p in (m, big)] == [1.275, 1.376]


def test_growing_and_constant_split():
    m = plan(preset("cbhybrid-m-8b"), 16384, memory_tokens=(256, 8))
    kinds = {k.kind: k for k in m.kinds}
    dense, lam = kinds["dense"], kinds["lambda"]
    # dense: keys/values and a segment id per position grow; only the length counters do not
    assert dense.kv_growing == dense.kv_bytes == 4 * 16896 * 4096 and dense.kv_constant == 0
    assert dense.bookkeeping_growing == 4 * 16896 * 4 and dense.bookkeeping_constant == 4 * 4
    # lambda: sinks + ring buffer, their segment ids, first slot and length: nothing grows
    assert lam.growing_bytes == 0 and lam.kv_constant == 28 * 8704 * 4096
    assert lam.bookkeeping_constant == 28 * (8704 * 4 + 4 + 4)
    assert m.growing_bytes + m.constant_bytes == m.total_bytes == m.kv_bytes + m.bookkeeping_bytes
    # twice the context: growing bytes double, constant bytes stay
    twice = plan(preset("cbhybrid-m-8b"), 2 * 16384, memory_tokens=(256, 8))
    assert twice.growing_bytes == 2 * m.growing_bytes and twice.constant_bytes == m.constant_bytes


def test_cli_prints_figures(capsys):
    for name, overrides, gb in [("cbhybrid-m-8b", ["--memory-tokens", "256:8"], "1.275 GB"),
                                ("cbhybrid-l-8b", ["--memory-tokens", "256:8"], "1.376 GB"),
                                ("llama3.1-8b", ["--dtype", "bfloat16"], "2.147 GB")]:
        assert main(["--config", str(PRESETS / f"{name}.yaml"), "--seq-len", "16384",
                     *overrides]) == 0
        out = capsys.readouterr().out
        assert "total keys/values: " in out and gb in out, out


@pytest.mark.parametrize("name,baseline,memory,percent", [
    ("cbhybrid-m-8b", "llama3.1-8b", [], "12.50%"),  # 4 of 32 layers grow
    ("cbhybrid-l-8b", "llama3.1-8b", [], "21.88%"),  # 7 / 32 = 21.875 %
    ("cbhybrid-l-8b", "cbhybrid-m-8b", ["--memory-tokens", "256:8"], "175.00%"),
])
def test_cli_baseline_percent(name, baseline, memory, percent, capsys):
    assert main(["--config", str(PRESETS / f"{name}.yaml"), "--seq-len", "16384", *memory,
                 "--baseline", str(PRESETS / f"{baseline}.yaml")]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"baseline {PRESETS / baseline}.yaml: sequence-growing ") and \
        last.endswith(f"sequence-growing cache is {percent} of it"), out


def test_cli_baseline_that_does_not_grow(tmp_path, capsys):
    flat = tmp_path / "all-lambda.yaml"
    flat.write_text((PRESETS / "cbhybrid-m-8b.yaml").read_text().replace(
        "dense: [0, 8, 16, 24]", "dense: []"))
    assert main(["--config", str(PRESETS / "cbhybrid-m-8b.yaml"), "--seq-len", "16384",
                 "--baseline", str(flat)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "does not grow" in captured.err, captured.err


def small_cfg():
    return ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48,
                       layer_pattern=("dense", "lambda", "lambda", "dense", "lambda"),
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=6),
                       lambda_=LambdaConfig(global_tokens=3, window=7))


def growing_bytes_allocated(a, b):
    """Bytes of the leaves of two allocated caches whose shapes differ (grew with max_len)."""
    return sum(cache_bytes(x) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
               if x.shape != y.shape)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planner_matches_allocated_cache(dtype):
    cfg = small_cfg()
    p = plan(cfg, 40, batch=3, dtype=dtype, memory_tokens=(16, 2))
    assert p.positions == 44
    cache = init_cache(cfg, 3, p.positions, jnp.dtype(dtype))
    assert kv_bytes(cache) == p.kv_bytes
    assert cache_bytes(cache) == p.kv_bytes + p.bookkeeping_bytes == p.total_bytes
    # lambda layers do not grow with the context, dense layers do
    longer = plan(cfg, 400, batch=3, dtype=dtype)
    lam = {k.kind: k for k in longer.kinds}["lambda"]
    assert lam.kv_bytes == {k.kind: k for k in p.kinds}["lambda"].kv_bytes
    long_cache = init_cache(cfg, 3, longer.positions, jnp.dtype(dtype))
    assert kv_bytes(long_cache) == longer.kv_bytes
    # the split against real arrays: what grew between the two allocations, and what stayed
    assert cache_bytes(long_cache) - cache_bytes(cache) == \
        longer.growing_bytes - p.growing_bytes > 0
    assert growing_bytes_allocated(cache, long_cache) == p.growing_bytes
    assert growing_bytes_allocated(long_cache, cache) == longer.growing_bytes
    assert longer.constant_bytes == p.constant_bytes > 0
    assert p.growing_bytes * longer.positions == longer.growing_bytes * p.positions  # linear


@pytest.mark.parametrize("name", ["cbhybrid-m-8b", "cbhybrid-l-8b"])
def test_presets_eval_shape(name):
    cfg = preset(name)
    p = plan(cfg, 16384, memory_tokens=(256, 8))
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, p.positions))
    assert kv_bytes(cache) == p.kv_bytes
    assert cache_bytes(cache) == p.kv_bytes + p.bookkeeping_bytes
    model = Transformer(cfg)
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    n_params = sum(a.size for a in jax.tree.leaves(variables))
    assert n_params == 8_030_261_248  # Llama-3.1-8B
    # one decode step on the full-size cache keeps every cache shape
    logits, new_cache = jax.eval_shape(
        lambda v, c: model.apply(v, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), c),
        variables, cache)
    assert logits.shape == (1, 1, 128256) and logits.dtype == jnp.float32
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_cache) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), cache)


@pytest.mark.parametrize("args,needle", [
    (["--seq-len", "10"], "--config"),
    (["--config", "{m}", "--seq-len", "0"], "--seq-len"),
    (["--config", "{m}", "--seq-len", "x"], "--seq-len"),
    (["--config", "{m}", "--seq-len", "10", "--memory-tokens", "256"], "E:M"),
    (["--config", "{m}", "--seq-len", "10", "--dtype", "int8"], "--dtype"),
    (["--config", "missing.yaml", "--seq-len", "10"], "missing.yaml"),
    (["--config", "{m}", "--seq-len", "10", "--override", "model.nope=1"], "model.nope"),
    (["--config", "{m}", "--seq-len", "10", "--baseline", "missing.yaml"], "missing.yaml"),
])
def test_cli_errors(args, needle, capsys):
    args = [a.format(m=PRESETS / "cbhybrid-m-8b.yaml") for a in args]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(args))
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in captured.err, captured.err


def test_ssm_state_is_constant_bytes_beside_the_growing_cache(capsys):
    """dense*2 + mamba2*3 (h 8, P 16, Z 32, conv over 2 x 64 + 2 x 2 x 32 channels, W 4), batch
    2, bfloat16 cache: the Mamba2 layers hold [B 3 C] bfloat16 conv windows and [B h P Z]
    float32 states at any context; only the dense layers grow."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=0,
                      layer_pattern=("dense",) * 2 + ("mamba2",) * 3,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                      mamba2=Mamba2Config(head_dim=16, state_size=32, n_groups=2))
    short, long = plan(cfg, 2048, batch=2, dtype="bfloat16"), plan(cfg, 32768, 2, "bfloat16")
    for p in (short, long):
        ssm = {k.kind: k for k in p.kinds}["mamba2"]
        assert ssm.recurrent and ssm.growing_bytes == 0
        state = 3 * (2 * 3 * (128 + 2 * 2 * 32) * 2 + 2 * 8 * 16 * 32 * 4)
        assert ssm.state_bytes == ssm.kv_constant == state == p.state_bytes
        assert ssm.bookkeeping_constant == 3 * (2 * 3 * 4 + 2 * 4)
    assert long.growing_bytes == 16 * short.growing_bytes > 0
    assert long.constant_bytes == short.constant_bytes


def test_cli_reads_an_hf_mamba2_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        '{"model_type": "mamba2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, '
        '"num_heads": 4, "head_dim": 16, "state_size": 8, "n_groups": 1}')
    assert main(["--config", str(tmp_path), "--seq-len", "32768"]) == 0
    out = capsys.readouterr().out
    # float32 cache: 2 layers x (3 x (64 + 2 x 8) conv + 4 x 16 x 8 state) x 4 bytes
    state = 2 * (3 * 80 + 4 * 16 * 8) * 4
    assert f"recurrent state (SSM states, conv windows; constant in the context): {state:,} B" \
        in out and "sequence-growing: 0 B" in out, out
