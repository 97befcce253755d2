"""Lambda layers under context parallelism (halo exchange, parallel/halo.py) on 8 simulated CPU
devices: sharded == unsharded forward and gradients, per-device memory that does not grow with
the total length, and a dense + lambda hybrid whose sharded train step equals one device's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxllama.kernels.flash_attention.api import BEYOND_WINDOW, ExtraColumns, Mask, attend

from jaxllama.config import KernelConfig, LambdaConfig
from jaxllama.mixers.lambda_attention import segment_offsets
from jaxllama.parallel import from_zigzag, to_zigzag
from jaxllama.parallel.halo import halo_lambda_attend
from jaxllama.sharding import make_mesh, use_mesh
from tests.test_sharding import CFG, REFERENCE_BATCH, _grads_and_update


def _inputs(b, t, seed, n=4, k=2, h=8):
    ks = jax.random.split(jax.random.key(seed), 6)
    shapes = [(b, t, n, h), (b, t, k, h), (b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)]
    q, kk, qd, k0, v, ct = (jax.random.normal(s, sh) for s, sh in zip(ks, shapes))
    # packed documents of 1..40 tokens: segments start anywhere, also just before a chunk end,
    # and run over several chunks
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for i in range(b):
        j, s = 0, 1
        while j < t:
            n_ = int(rng.integers(1, 40))
            seg[i, j:j + n_] = s
            j, s = j + n_, s + 1
    return (q, kk, qd, k0, v), ct, jnp.asarray(seg)


def _reference(q, k, qd, k0, v, seg, window, g):
    """The unsharded packed-row lambda rule (the mixer's `cache=None` path with segment ids)."""
    extra = None
    if g:
        sink_seg = jnp.where(segment_offsets(seg) < g, seg, -1)
        extra = ExtraColumns(k0, v, BEYOND_WINDOW, q=qd, segment_ids=sink_seg)
    mask = Mask(causal=True, window=window, q_segment_ids=seg, kv_segment_ids=seg)
    return attend(q, k, v, mask, extra=extra, implementation="xla")


def _with_grads(fn):
    """(ct, *args) -> (fn(*args), gradients of <fn(*args), ct> for every arg): one program."""
    def both(ct, *args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct)
    return both


@pytest.mark.parametrize("window, g", [(5, 3), (21, 4), (40, 0)],
                         ids=["halo-one-chunk", "halo-three-chunks", "no-sinks"])
def test_halo_matches_unsharded_lambda(window, g):
    """seq axis of 8, chunks of 8 tokens: a window inside one chunk, spanning three, and no sinks;
    outputs and the gradients of all five inputs equal the unsharded rule."""
    ways, t = 8, 128
    args, ct, seg = _inputs(2, t, seed=window)
    ref, ref_grads = jax.jit(_with_grads(lambda *a: _reference(*a, seg, window, g)))(ct, *args)
    zargs = [to_zigzag(a, ways) for a in args]
    zseg, zct = to_zigzag(seg, ways), to_zigzag(ct, ways)

    def sharded(*a):
        return halo_lambda_attend(*a, zseg, window=window, global_tokens=g, implementation="xla")

    with use_mesh(make_mesh({"data": 1, "seq": ways})):
        out, grads = jax.jit(_with_grads(sharded))(zct, *zargs)  # one compile per case
    np.testing.assert_allclose(from_zigzag(out, ways), ref, atol=2e-6, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(from_zigzag(got, ways), want, atol=5e-6, rtol=1e-5)


def _temp_bytes(fn, ways, local):
    """Per-device temporary bytes of fn's forward + backward, compiled for a seq axis of `ways`
    devices at `local` tokens per device (XLA's memory analysis of the SPMD program)."""
    mesh = make_mesh({"data": 1, "seq": ways}, jax.devices()[:ways])
    t = ways * local
    args, _, seg = _inputs(1, t, seed=1, n=2, k=1, h=16)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    loss = lambda *a: jnp.sum(fn(*a, seg))
    with use_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_lambda_memory_per_device_does_not_grow_with_total_length():
    """At 512 tokens per device, 2 and 8 devices (1K and 4K tokens in all): the lambda layer's
    per-device temporaries stay within 10% (all-gather dense attention, which holds the whole
    K/V, fails this bound in the same setting)."""
    def lam(q, k, qd, k0, v, seg):
        return halo_lambda_attend(q, k, qd, k0, v, seg, window=64, global_tokens=4,
                                  implementation="xla")

    small, large = _temp_bytes(lam, 2, 512), _temp_bytes(lam, 8, 512)
    assert abs(large - small) <= 0.1 * small, (small, large)


def test_hybrid_dense_lambda_train_step_seq_sharded():
    """Dense (ring) + lambda (halo) layers in one model on a data x seq = 2 x 4 mesh (chunks of 4
    tokens, so the window of 6 spans two chunks), fed the zigzag layout: loss, gradients and the
    AdamW update equal one device's."""
    cfg = CFG.replace(layer_pattern=("dense", "lambda"),
                      lambda_=LambdaConfig(global_tokens=3, window=6))
    ref, _ = _grads_and_update(make_mesh({}, jax.devices()[:1]), REFERENCE_BATCH, cfg,
                               loss_chunk=8)
    batch = {k: to_zigzag(a, 4) for k, a in REFERENCE_BATCH.items()}
    got, _ = _grads_and_update(make_mesh({"data": 2, "seq": 4}), batch,
                               cfg.replace(kernels=KernelConfig(context_parallel="ring")),
                               loss_chunk=8)
    (l0, n0, g0, p0), (l1, n1, g1, p1) = ref[:4], got[:4]
    assert n0 == n1
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
