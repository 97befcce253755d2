"""Sequence-parallel scans on 8 simulated CPU devices == the unsharded sequential scan, forward
(y and the final state) and gradients of every input, for Mamba2 and Mamba1, in the contiguous
and the zigzag layout, with packed segments whose documents cross device boundaries, a shard of
padding only, and an initial state. One compile per (form, layout)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxllama.kernels.ssm_scan import reference

from jaxllama.parallel.layout import from_zigzag, to_zigzag
from jaxllama.parallel.ssm_sequence import (
    conv_halo,
    piece_order,
    sequence_selective_scan,
    sequence_ssd_scan,
)

# tiny shapes: compile time dominates (tests/kernels/kernel_test_base.py)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
WAYS = 8
S = 64  # 8 tokens per device, 4 per zigzag piece


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:WAYS]), ("seq",))


def _segments():
    """Row 0: documents crossing devices, a device of padding only (tokens 24-31), a padding hole,
    a document restarting with an id seen before, one starting at a device boundary; row 1: one
    document, left padding."""
    row0 = np.ones(S, np.int32)
    row0[13:24] = 2
    row0[24:32] = 0
    row0[32:45] = 2  # continues document 2 across the padding device
    row0[45:52] = 3
    row0[50] = 0
    row0[52:] = 1  # a new document (id 1 again after 3): a reset
    row0[56:] = 4  # a document starting exactly where a device's (and a zigzag piece's) shard does
    row1 = np.where(np.arange(S) < 5, 0, 7).astype(np.int32)
    return np.stack([row0, row1])


def _inputs(form: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    b, g, n = 2, 2, 4
    if form == "ssd":
        h, p = 4, 3
        xs = {"x": f(b, S, h, p), "dt": jax.nn.softplus(f(b, S, h)), "A": -jnp.exp(0.5 * f(h)),
              "B": f(b, S, g, n), "C": f(b, S, g, n), "D": f(h), "initial_state": f(b, h, p, n)}
        ct = (f(b, S, h, p), f(b, h, p, n))
    else:
        d = 4
        xs = {"u": f(b, S, d), "delta": jax.nn.softplus(f(b, S, d)), "A": -jnp.exp(0.5 * f(d, n)),
              "B": f(b, S, g, n), "C": f(b, S, g, n), "D": f(d), "initial_state": f(b, d, n)}
        ct = (f(b, S, d), f(b, d, n))
    return xs, ct


PER_TOKEN = ("x", "dt", "u", "delta", "B", "C")


def _sharded(form, layout, mesh, seg):
    scan = sequence_ssd_scan if form == "ssd" else sequence_selective_scan
    kw = {"chunk_size": 3} if form == "ssd" else {}  # chunks ragged within each piece

    def run(xs, seg):
        names = sorted(xs)
        spec = lambda k: P(None, "seq") if k in PER_TOKEN else P()

        def local(*args):
            *vals, sg = args
            return scan(**dict(zip(names, vals)), segment_ids=sg, layout=layout,
                        implementation="xla", **kw)

        f = jax.shard_map(local, mesh=mesh, in_specs=(*[spec(k) for k in names], P(None, "seq")),
                          out_specs=(P(None, "seq"), P()), check_vma=False)
        return f(*[xs[k] for k in names], seg)
    return run


@functools.cache
def _truth(form):
    xs, ct = _inputs(form)
    spec = reference.ssd_sequential if form == "ssd" else reference.selective_sequential
    seg = _segments()

    def go(xs):
        out, vjp = jax.vjp(lambda xs: spec(**xs, segment_ids=seg), xs)
        return out, vjp(ct)[0]
    return jax.jit(go).lower(xs).compile(FAST_COMPILE)(xs)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("form", ["ssd", "selective"])
def test_sharded_equals_unsharded(mesh, form, layout):
    xs, (ct_y, ct_f) = _inputs(form)
    seg = _segments()
    z = (lambda a: to_zigzag(a, WAYS)) if layout == "zigzag" else (lambda a: a)
    zs = {k: z(v) if k in PER_TOKEN else v for k, v in xs.items()}
    run = _sharded(form, layout, mesh, seg)

    def go(zs, seg):
        out, vjp = jax.vjp(lambda zs: run(zs, seg), zs)
        return out, vjp((z(ct_y), ct_f))[0]

    zseg = jnp.asarray(z(seg))
    (y, final), grads = jax.jit(go).lower(zs, zseg).compile(FAST_COMPILE)(zs, zseg)
    (want_y, want_f), want_grads = _truth(form)
    un = (lambda a: from_zigzag(a, WAYS)) if layout == "zigzag" else (lambda a: a)
    np.testing.assert_allclose(un(y), want_y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(final, want_f, rtol=2e-5, atol=2e-5)
    for k, g in grads.items():
        got = un(g) if k in PER_TOKEN else g
        np.testing.assert_allclose(got, want_grads[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_piece_order_and_conv_halo(mesh):
    np.testing.assert_array_equal(piece_order(2, "zigzag"), [0, 2, 3, 1])
    np.testing.assert_array_equal(piece_order(3, "contiguous"), [0, 1, 2])
    tokens = jnp.arange(1, S + 1, dtype=jnp.float32)[None, :, None]  # [1 S 1], token t = t + 1
    halo = lambda layout: jax.jit(jax.shard_map(
        functools.partial(conv_halo, width=3, layout=layout), mesh=mesh,
        in_specs=P(None, "seq"), out_specs=P(None, "seq"), check_vma=False))
    got = np.asarray(halo("contiguous")(tokens))[0, :, :, 0]  # [devices 3]
    want = [[0, 0, 0]] + [[8 * r - 2, 8 * r - 1, 8 * r] for r in range(1, WAYS)]
    np.testing.assert_array_equal(got, want)
    got = np.asarray(halo("zigzag")(to_zigzag(tokens, WAYS)))[0, :, :, 0]  # [2 W, 3]
    starts = [q * 4 for r in range(WAYS) for q in (r, 2 * WAYS - 1 - r)]  # each piece's first
    want = [[0, 0, 0] if st == 0 else [st - 2, st - 1, st] for st in starts]
    np.testing.assert_array_equal(got, want)
