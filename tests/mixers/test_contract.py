"""The contract every registered layer kind keeps, parametrised over `jaxllama.mixers.REGISTRY`.

A new kind inherits these tests by registering its spec and adding one entry to `TINY` (its
knobs on a tiny model): full forward == chunked prefill + one-token decode steps; a left-padded row
== the row alone (with and without a cache); the cache's logical-axes tree matches its array tree;
cache bytes constant or linear in max_len as the spec declares; a forward traced (`jax.eval_shape`)
with sharded params and inputs on 8 simulated CPU devices, for every context-parallel mode the
spec lists.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.config import (
    AttentionConfig,
    FoTConfig,
    KernelConfig,
    LambdaConfig,
    Mamba2Config,
    MambaConfig,
    MLAConfig,
    ModelConfig,
    RopeConfig,
)
from jaxllama.mixers import REGISTRY
from jaxllama.model import Transformer, cache_logical_axes, init_cache
from jaxllama.sharding import axes_shardings, batch_sharding, make_mesh, param_shardings, use_mesh
from jaxllama.training.step import abstract_params

# One entry per registered kind: the ModelConfig fields its layers need beyond the base below.
# Small windows so that 12 tokens reach past every kind's short-range structure.
TINY = {
    "dense": {},
    "lambda": {"lambda_": LambdaConfig(global_tokens=2, window=5)},
    "mamba": {"mamba": MambaConfig(state_size=4, n_groups=2)},
    "mamba2": {"mamba2": Mamba2Config(head_dim=8, state_size=4, n_groups=2, chunk_size=4)},
    # the prompt tail covers T: a full forward is one window, as chunked prefill is
    "fot": {"fot": FoTConfig(last_context_length=16, mem_dtype="float32")},
    "fot_local": {"fot": FoTConfig(last_context_length=16, mem_dtype="float32")},
    # Zebra-Llama-shaped: q latent, kv_b at GQA width (2 kv heads over 4 query heads), yarn
    "mla": {"mla": MLAConfig(num_heads=4, num_kv_heads=2, q_lora_rank=16, kv_lora_rank=8,
                             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                             rope=RopeConfig(type="yarn", factor=4.0,
                                             original_max_position_embeddings=16))},
}
BASE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "max_position_embeddings": 64,
        "attention": AttentionConfig(num_heads=4, num_kv_heads=2)}
KINDS = sorted(REGISTRY)
T, PAD, MAX_LEN = 12, 3, 16
CHUNKS = [4, 4, 1, 1, 1, 1]  # two prefill chunks, then one-token decode steps


def model_cfg(kind: str, layers: int = 1, **kw) -> ModelConfig:
    return ModelConfig(layer_pattern=(kind,) * layers, **BASE, **TINY[kind], **kw)


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def mixer(kind):
    """(spec, its sub-config, the module, params, apply) for a one-layer model of `kind`."""
    spec = REGISTRY[kind]
    sub = spec.config(model_cfg(kind))
    module = spec.module(cfg=sub)
    x = jax.random.normal(jax.random.key(0), (1, T, BASE["hidden_size"]))
    params = module.init(jax.random.key(1), x, jnp.arange(T)[None])["params"]
    apply = jax.jit(lambda x, pos, cache, seg: module.apply({"params": params}, x, pos, cache, seg))
    return spec, sub, module, params, apply


def test_every_registered_kind_has_a_tiny_entry():
    assert set(TINY) == set(REGISTRY)


def hidden(seed, batch=2):
    return jax.random.normal(jax.random.key(seed), (batch, T, BASE["hidden_size"]), jnp.float32)


def run_cached(spec, sub, apply, x, positions, segment_ids, chunks):
    """Feed x [B T D] through the cache in chunks of the given sizes: outputs [B T D]."""
    cache = spec.cache.init(sub, x.shape[0], MAX_LEN, jnp.float32)
    out, at = [], 0
    for n in chunks:
        y, cache = apply(x[:, at:at + n], positions[:, at:at + n], cache,
                         segment_ids[:, at:at + n])
        out.append(y)
        at += n
    assert at == x.shape[1]
    return jnp.concatenate(out, axis=1)


def test_full_forward_equals_chunked_prefill_and_decode(mixer):
    spec, sub, _, _, apply = mixer
    x = hidden(2)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    seg = jnp.ones((2, T), jnp.int32)
    full, cache = apply(x, pos, None, None)
    assert cache is None
    stepped = run_cached(spec, sub, apply, x, pos, seg, CHUNKS)
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_left_padded_row_equals_the_row_alone(mixer):
    """Row 0 holds PAD padding tokens (segment id 0, position 0) then T - PAD real tokens; row 1
    is unpadded. Row 0's real outputs equal those of the same tokens run alone, in a training
    pass (segment ids) and through the cache (the same chunks as above)."""
    spec, sub, _, _, apply = mixer
    x = hidden(3)
    n = T - PAD
    seg = jnp.ones((2, T), jnp.int32).at[0, :PAD].set(0)
    pos = jnp.stack([jnp.maximum(jnp.arange(T) - PAD, 0), jnp.arange(T)])
    alone, _ = apply(x[:1, PAD:], jnp.arange(n)[None], None, None)
    padded, _ = apply(x, pos, None, seg)
    np.testing.assert_allclose(np.asarray(padded[0, PAD:]), np.asarray(alone[0]), rtol=1e-5,
                               atol=1e-5)
    cached = run_cached(spec, sub, apply, x, pos, seg, CHUNKS)
    np.testing.assert_allclose(np.asarray(cached[0, PAD:]), np.asarray(alone[0]), rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.isfinite(np.asarray(cached)))


def test_cache_axes_tree_matches_cache_tree(mixer):
    spec, sub, *_ = mixer
    cache = jax.eval_shape(lambda: spec.cache.init(sub, 2, MAX_LEN, jnp.bfloat16))
    axes = spec.cache.logical_axes(sub)
    is_axes = lambda a: isinstance(a, tuple) and all(isinstance(n, str) for n in a)
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(cache)
    for names, leaf in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(cache),
                           strict=True):
        assert len(names) == leaf.ndim, (names, leaf.shape)


def test_cache_bytes_follow_the_declared_growth(mixer):
    spec, sub, *_ = mixer

    def nbytes(max_len):
        shapes = jax.eval_shape(lambda: spec.cache.init(sub, 2, max_len, jnp.bfloat16))
        return sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(shapes))

    b64, b128, b192 = nbytes(64), nbytes(128), nbytes(192)
    if spec.cache_growth == "constant":
        assert b64 == b128 == b192
    else:
        assert spec.cache_growth == "linear"
        assert b128 - b64 == b192 - b128 > 0


@pytest.mark.parametrize("cached", [False, True], ids=["train", "decode"])
def test_sharded_forward_traces_on_8_devices(kind, cached):
    """Params, tokens and cache carry their shardings (data x tensor x seq = 2 x 2 x 2); the
    forward is traced for every context-parallel mode the spec lists (training pass only)."""
    assert len(jax.devices()) == 8
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "seq": 2})
    modes = ("none",) if cached else ("none",) + REGISTRY[kind].context_parallel
    for mode in modes:
        cfg = model_cfg(kind, layers=2, kernels=KernelConfig(context_parallel=mode))
        model = Transformer(cfg)
        boxed = abstract_params(model)
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              jax.tree.map(lambda b: b.unbox() if hasattr(b, "unbox") else b,
                                           boxed, is_leaf=lambda b: hasattr(b, "unbox")),
                              param_shardings(boxed, mesh))
        # 16 training tokens: 4 zigzag pieces on seq=2, each at least a Mamba conv halo (W-1)
        t = 1 if cached else 16
        tokens = jax.ShapeDtypeStruct((4, t), jnp.int32, sharding=batch_sharding(mesh))
        cache = None
        if cached:
            shapes = jax.eval_shape(lambda c=cfg: init_cache(c, 4, MAX_LEN))
            sh = axes_shardings(cache_logical_axes(cfg), mesh, shapes)
            cache = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d),
                                 shapes, sh)
        with use_mesh(mesh):
            logits, new_cache = jax.eval_shape(
                lambda p, tok, c, m=model: m.apply({"params": p}, tok, cache=c), params, tokens,
                cache)
        assert logits.shape == (4, t, BASE["vocab_size"]), mode
        if cached:
            assert jax.tree.structure(new_cache) == jax.tree.structure(cache)
