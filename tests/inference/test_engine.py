"""The generation engine on tiny random models: cached decode equals the full forward, a padded
batch equals each prompt alone, EOS stops a row, streaming and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama import AttentionConfig, ModelConfig, RopeConfig, Transformer, init_cache, init_params
from jaxllama.inference.decode import DecodeLayout, decode_caches, decode_weights
from jaxllama.inference.engine import Engine, GenerationError, prompt_bucket
from jaxllama.inference.sampling import SamplingConfig
from jaxllama.model import stack_params, unstack_params

V = 97


def tiny(tied: bool, layers=("dense",) * 3, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, layer_pattern=layers,
                       max_position_embeddings=64,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2,
                                                 rope=RopeConfig(theta=500.0)),
                       tie_word_embeddings=tied, **kw)


def random_params(cfg, seed=0):
    # Larger weights than the init default: sharp logits, so greedy choices are not near-ties.
    params = jax.jit(functools.partial(init_params, cfg))(jax.random.key(seed))
    return jax.tree.map(lambda a: a * 8 if a.ndim >= 2 else a, params)


REF_LEN = 32


@functools.cache
def _forward(cfg):
    return jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])


def full_greedy(cfg, params, prompt, n, ref_len=REF_LEN):
    """Reference: greedy decoding by re-running the full (cache-free) forward every token, on one
    fixed-size buffer (causal: tokens after the read position cannot change its logits)."""
    buf = np.zeros((1, ref_len), np.int32)
    ids = list(prompt)
    for _ in range(n):
        buf[0, :len(ids)] = ids
        ids.append(int(np.argmax(_forward(cfg)(params, buf)[0, len(ids) - 1])))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def model():
    cfg = tiny(tied=False)
    return cfg, random_params(cfg)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(*model)


@pytest.mark.parametrize("layout", [DecodeLayout(unstacked=True, separate_head=True),
                                    DecodeLayout()])
def test_cached_decode_equals_full_forward(layout):
    """Chunked prefill (model cache) + one-token steps through the same `Transformer` in the
    decode layout (per-layer weights and caches, tied head transposed; or the params in place)
    reproduce the full forward's logits at every position."""
    cfg = tiny(tied=True)
    params = random_params(cfg, seed=1)
    ids = jax.random.randint(jax.random.key(2), (2, 14), 0, V)
    model = Transformer(cfg)
    full = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, ids)

    pos = jnp.broadcast_to(jnp.arange(14), (2, 14))
    chunk = jax.jit(lambda p, t, q, c: model.apply({"params": p}, t, q, c))
    dec = layout.model(cfg)
    step = jax.jit(lambda w, t, q, c: dec.apply({"params": w}, t, q, c))
    cache = init_cache(cfg, 2, 32)
    parts = []
    for a, b in [(0, 4), (4, 8)]:  # two prefill chunks through one compiled call
        lg, cache = chunk(params, ids[:, a:b], pos[:, a:b], cache)
        parts.append(lg)
    weights = decode_weights(cfg, params, jnp.float32, layout)
    assert (weights is params) == (layout == DecodeLayout())  # in place: no copy
    assert ("layer_0" in weights) == layout.unstacked
    if layout.separate_head:  # the tied table transposed, [D V]
        np.testing.assert_array_equal(weights["lm_head"]["kernel"],
                                      np.asarray(params["embed"]["embedding"]).T)
    caches = decode_caches(cfg, cache, layout)
    assert len(caches) == (cfg.num_layers if layout.unstacked else len(cfg.runs))
    for t in range(8, 14):
        lg, caches = step(weights, ids[:, t:t + 1], pos[:, t:t + 1], caches)
        parts.append(lg)
    got = jnp.concatenate(parts, axis=1)
    assert float(jnp.abs(full).max()) > 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5, rtol=1e-5)


def test_engine_greedy_equals_full_forward_and_padding_is_invisible(model, engine):
    """Three prompts of different lengths in one left-padded batch give exactly the tokens of
    greedy decoding with the full forward on each prompt alone."""
    cfg, params = model
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, V, n).tolist() for n in (5, 12, 2)]
    out = engine.generate(prompts, max_new_tokens=9)
    assert out.tokens.shape == (3, 9) and list(out.lengths) == [9, 9, 9]
    for b, p in enumerate(prompts):
        assert out.row(b) == full_greedy(cfg, params, p, 9), b
        alone = engine.generate([p], max_new_tokens=9)
        assert alone.row(0) == out.row(b)


@pytest.fixture(scope="module")
def scanned_engine(model):
    """The GPU/TPU decode layout on CPU: stacked weights used in place, scanned runs."""
    return Engine(*model, prefill_chunk=8, unstacked=False, separate_head=False)


def test_chunked_prefill_and_scanned_decode_agree(model, scanned_engine):
    """A prompt longer than `prefill_chunk` (prefilled in 3 chunks) and the scanned decode loop
    over the params in place give the full forward's tokens."""
    cfg, params = model
    prompt = np.random.RandomState(1).randint(0, V, 21).tolist()
    want = full_greedy(cfg, params, prompt, 6)
    chunked = scanned_engine
    assert chunked.decode_weights() is params
    assert prompt_bucket(21, 8) == 24
    assert chunked.generate([prompt], max_new_tokens=6).row(0) == want


def test_eos_stops_each_row_and_pads(engine):
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, V, n).tolist() for n in (4, 7)]
    free = engine.generate(prompts, max_new_tokens=10)
    eos = int(free.tokens[0, 3])  # row 0's fourth token becomes the EOS
    first0 = free.row(0).index(eos)
    out = engine.generate(prompts, max_new_tokens=10, eos_ids=[V - 1, eos], pad_id=V - 2)
    assert out.stopped[0] and out.lengths[0] == first0 + 1
    assert out.row(0) == free.row(0)[:first0 + 1]
    assert (out.tokens[0, first0 + 1:] == V - 2).all()  # finished rows emit the pad id
    row1 = free.row(1)
    n1 = row1.index(eos) + 1 if eos in row1 else 10
    assert out.row(1) == row1[:n1] and out.lengths[1] == n1


def test_stop_when_all_rows_done_and_streaming(engine):
    prompt = np.random.RandomState(3).randint(0, V, 6).tolist()
    free = engine.generate([prompt, prompt], max_new_tokens=8)
    eos = free.row(0)[2]
    seen = []
    out = engine.generate([prompt, prompt], max_new_tokens=8, eos_ids=[eos],
                          on_token=lambda step, tok, active: seen.append((step, tok.tolist(),
                                                                          active.tolist())))
    n = free.row(0).index(eos) + 1
    assert out.steps == n and out.tokens.shape[1] == n  # the loop ended early
    assert [s for s, _, _ in seen] == list(range(n))
    assert [t[0] for _, t, _ in seen] == free.row(0)[:n]
    assert all(a == [True, True] for _, _, a in seen)


def _live_cache_keys(cfg, batch, slots):
    """How many live arrays have the shape of a stacked [n B S K H] and of a per-layer
    [B S K H] dense cache key/value buffer."""
    a = cfg.attention
    layer = (batch, slots, a.num_kv_heads, a.head_dim_for(cfg.hidden_size))
    shapes = [x.shape for x in jax.live_arrays()]
    return shapes.count((cfg.num_layers,) + layer), shapes.count(layer)


@pytest.mark.parametrize("layout", ["unstacked", "scanned"])
def test_stacked_cache_donated_at_decode(model, engine, scanned_engine, layout):
    """While the decode loop runs, only its own caches are live: the stacked cache prefill wrote
    was donated (per-layer caches replace it on CPU; scanned, the loop holds those very
    buffers)."""
    cfg, _ = model
    eng, prompt_len, new = (engine, 6, 8) if layout == "unstacked" else (scanned_engine, 21, 6)
    prompt = np.random.RandomState(9).randint(0, V, prompt_len).tolist()  # compiled shapes
    seen = []
    eng.generate([prompt], max_new_tokens=new,
                 on_token=lambda *_: seen.append(_live_cache_keys(cfg, 1, 128)))
    want = (0, 2 * cfg.num_layers) if layout == "unstacked" else (2, 0)  # k and v per cache
    assert len(seen) == new and all(s == want for s in seen), seen


def test_sampling_reproducible_with_seed(model, engine):
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    cfg_s = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)
    a = engine.generate(prompts, 12, cfg_s, seed=11)
    b = engine.generate(prompts, 12, cfg_s, seed=11)
    c = engine.generate(prompts, 12, SamplingConfig(temperature=1.0, top_k=20, top_p=0.9),
                        seed=12)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    sampled = [k for k in engine._compiled if k[0] == "chunk" and ("greedy", False) in k[2]]
    assert len(sampled) == 1  # seed and top_p values are traced: nothing recompiled


def test_bfloat16_prefill_float32_decode(model, monkeypatch):
    import jaxllama.inference.engine as engine_mod

    cfg, params = model
    prompt = np.random.RandomState(4).randint(0, V, 9).tolist()
    # CPU defaults: float32 decode; prefill float32 unless bfloat16 params on a CPU with bfloat16
    # units
    for units, want in [(False, "float32"), (True, "bfloat16")]:
        monkeypatch.setattr(engine_mod, "cpu_has_bfloat16_units", lambda units=units: units)
        default = Engine(cfg.replace(param_dtype="bfloat16"), params)
        assert default.prefill_cfg.dtype == want and default.decode_cfg.dtype == "float32"
        assert Engine(cfg, params).prefill_cfg.dtype == "float32"  # float32 params
    bf = Engine(cfg, params, prefill_dtype="bfloat16")
    assert bf.prefill_cfg.dtype == "bfloat16" and bf.decode_cfg.dtype == "float32"
    out = bf.generate([prompt], max_new_tokens=5)
    ref = full_greedy(cfg, params, prompt, 5)
    assert out.row(0) == ref


def test_context_limits(engine):  # max_position_embeddings = 64
    with pytest.raises(GenerationError, match="64 tokens but the context holds 64"):
        engine.generate([list(range(64))], max_new_tokens=4)
    with pytest.raises(GenerationError, match="context holds 10"):
        engine.generate([list(range(12))], max_new_tokens=4, max_len=10)
    with pytest.raises(GenerationError, match="empty"):
        engine.generate([[1, 2], []], max_new_tokens=4)
    out = engine.generate([list(range(60))], max_new_tokens=50)
    assert out.steps == 4  # clamped to the context


@pytest.fixture(scope="module")
def hybrid():
    from jaxllama.config import LambdaConfig

    cfg = tiny(True, layers=("dense", "lambda", "lambda"),
               lambda_=LambdaConfig(global_tokens=2, window=4))
    params = random_params(cfg, seed=5)
    return cfg, params, Engine(cfg, params)


@pytest.mark.parametrize("n", [16, 7])
def test_hybrid_layer_pattern(hybrid, n):
    """A pattern with two runs (dense, then lambda) decodes through per-layer weights and caches
    like the full forward, with a prompt filling its bucket (16) or left-padded (7)."""
    cfg, params, engine = hybrid
    prompt = np.random.RandomState(5).randint(0, V, n).tolist()
    out = engine.generate([prompt], max_new_tokens=6)
    assert out.row(0) == full_greedy(cfg, params, prompt, 6)


def test_unstacked_layout_round_trip_and_forward(hybrid):
    """`unstack_params` gives exactly the tree `Transformer(unstacked=True, separate_head=True)`
    initializes (same paths and shapes), `stack_params` inverts it exactly, and the unstacked
    model computes the stacked model's logits (a dense/lambda hybrid: two runs)."""
    cfg, params, _ = hybrid
    flat = unstack_params(cfg, params, separate_head=True)
    want = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), unstacked=True,
                                              separate_head=True))
    assert jax.tree.structure(flat) == jax.tree.structure(want)
    assert jax.tree.map(jnp.shape, flat) == jax.tree.map(lambda s: s.shape, want)
    np.testing.assert_array_equal(flat["layer_2"]["mlp"]["up"]["kernel"],
                                  params["run_1"]["block"]["mlp"]["up"]["kernel"][1])
    back = stack_params(cfg, flat)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    ids = jax.random.randint(jax.random.key(4), (1, REF_LEN), 0, V)  # full_greedy's shape
    ref = _forward(cfg)(params, ids)
    flat_model = Transformer(cfg, unstacked=True, separate_head=True)
    got = jax.jit(lambda p, t: flat_model.apply({"params": p}, t)[0])(flat, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_all_lambda_model_generates_past_max_position_embeddings():
    """Lambda layers only: no position limit (max_position_embeddings = 64 here), a 150-token
    prompt decodes like the full forward; max_len still caps it."""
    from jaxllama.config import LambdaConfig

    cfg = tiny(True, layers=("lambda",) * 2, lambda_=LambdaConfig(global_tokens=3, window=8))
    params = random_params(cfg, seed=7)
    eng = Engine(cfg, params)
    prompt = np.random.RandomState(7).randint(0, V, 150).tolist()
    out = eng.generate([prompt], max_new_tokens=5)
    assert out.steps == 5
    assert out.row(0) == full_greedy(cfg, params, prompt, 5, ref_len=160)
    with pytest.raises(GenerationError, match="150 tokens but the context holds 100"):
        eng.generate([prompt], max_new_tokens=5, max_len=100)
    assert eng.generate([prompt], max_new_tokens=50, max_len=153).steps == 3
