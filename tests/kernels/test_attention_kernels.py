"""Every attention implementation against the naive dense softmax: output, log-sum-exp and `jax.vjp`
gradients (dq, dk, dv and the sink inputs, with a cotangent on the lse too), for every mask kind,
float32 and bfloat16, ragged lengths and GQA group sizes 1, 4, 8. Each Pallas case also proves its
kernels ran (their names in the compiled HLO). One test class per implementation; interpret mode is
slow, so the Pallas classes run the cases marked for them (each kind and dtype still covered)."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jaxllama.kernels import _dispatch
from jaxllama.kernels.flash_attention import reference
from jaxllama.kernels.flash_attention.api import Mask, SinkInputs, UnavailableImplementation, attend

# max |got - want| / max |want| per dtype; bfloat16 inputs are compared with the float32 naive
# softmax of the same (rounded) inputs, so the bound covers bf16 outputs and bf16 matmul operands.
TOLERANCE = {
    "float32": {"out": 1e-5, "lse": 1e-5, "grad": 3e-5},
    "bfloat16": {"out": 1.5e-2, "lse": 1e-4, "grad": 3e-2},
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    t: int
    s: int
    heads: tuple  # (N, K): group size N // K
    dtype: str = "float32"
    causal: bool = True
    window: int | None = None
    memory_prefix: int = 0
    q_offset: int = 0
    k_offset: int = 0
    traced: bool = False  # offsets are jit arguments
    segments: str | None = None  # packed | cache | mismatch
    sinks: int = 0  # lambda sink columns; -1: every token a sink (packed lambda)
    blocks: tuple = (16, 16)
    pallas_gpu: bool = True
    pallas_tpu: bool = False


B, H = 2, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0}
CASES = [
    Case("causal_g1_ragged", 19, 19, (2, 2), pallas_tpu=True),
    Case("causal_g4_bf16", 21, 21, (4, 1), "bfloat16"),
    Case("window_g8", 37, 37, (8, 1), window=5, blocks=(16, 8)),
    Case("window_g1_bf16", 40, 40, (2, 2), "bfloat16", window=9, pallas_tpu=True),
    Case("lambda_sinks_g4", 35, 35, (4, 1), window=6, sinks=3, pallas_tpu=True),
    Case("lambda_packed_bf16", 30, 30, (2, 2), "bfloat16", window=4, segments="packed", sinks=-1),
    Case("segments_packed_g4_bf16", 33, 33, (4, 1), "bfloat16", segments="packed",
         pallas_tpu=True),
    Case("memory_prefix_fot", 20, 26, (2, 2), window=7, memory_prefix=6, k_offset=-6,
         segments="packed_kv", pallas_tpu=True),
    Case("chunked_prefill_traced", 6, 30, (4, 1), q_offset=17, traced=True, segments="cache",
         pallas_tpu=True),
    Case("decode_traced_g8_bf16", 1, 40, (8, 1), "bfloat16", q_offset=23, traced=True,
         segments="cache"),
    Case("bidirectional_empty_rows", 18, 23, (2, 2), causal=False, segments="mismatch",
         k_offset=5, blocks=(8, 16), pallas_gpu=False),
    Case("ring_block_offsets_bf16", 16, 16, (4, 1), "bfloat16", q_offset=16, k_offset=0,
         blocks=(8, 8), pallas_gpu=False),
]


def _segment_ids(case: Case, rng):
    if case.segments in ("packed", "packed_kv"):
        ids = np.sort(rng.integers(1, 4, (B, case.t)), axis=1).astype(np.int32)
        if case.segments == "packed":
            return ids, ids
        # FoT: memory columns belong to each row's first document, then the local keys
        return ids, np.concatenate([np.repeat(ids[:, :1], case.memory_prefix, 1), ids], axis=1)
    if case.segments == "cache":  # slots at or past the written length are empty (id 0)
        kv = (np.arange(case.s) < case.q_offset + case.t).astype(np.int32)
        return np.ones((B, case.t), np.int32), np.repeat(kv[None], B, 0)
    if case.segments == "mismatch":  # rows of segment 3 see no key at all
        return (rng.integers(1, 4, (B, case.t)).astype(np.int32),
                rng.integers(1, 3, (B, case.s)).astype(np.int32))
    return None, None


def _inputs(case: Case, seed: int = 0):
    """Differentiable inputs (q, k, v[, sink q, k, v]), the mask builder, and the sink segments."""
    rng = np.random.default_rng(seed)
    n, kh = case.heads
    dt = jnp.dtype(case.dtype)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dt)
    xs = [normal(B, case.t, n, H), normal(B, case.s, kh, H), normal(B, case.s, kh, H)]
    qseg, kseg = _segment_ids(case, rng)
    sseg = None
    if case.sinks:
        g = case.t if case.sinks < 0 else case.sinks
        xs += [normal(B, case.t, n, H), normal(B, g, kh, H), normal(B, g, kh, H)]
        if case.sinks < 0:  # the first 2 tokens of each segment are sinks, the rest id -1
            first = np.concatenate([np.ones((B, 1), bool), qseg[:, 1:] != qseg[:, :-1]], 1)
            start = np.maximum.accumulate(np.where(first, np.arange(case.t), 0), axis=1)
            sseg = np.where(np.arange(case.t) - start < 2, qseg, -1).astype(np.int32)

    def mask(q_offset, k_offset):
        return Mask(causal=case.causal, window=case.window, memory_prefix=case.memory_prefix,
                    q_offset=q_offset, k_offset=k_offset, q_segment_ids=qseg, kv_segment_ids=kseg)

    return xs, mask, sseg


def _split(case, xs, sseg):
    return xs[:3], (SinkInputs(*xs[3:], segment_ids=sseg) if case.sinks else None)


@functools.cache
def _truth(case: Case):
    """The naive float32 softmax's (out, lse, grads) and the cotangents (dout, dlse) used."""
    xs, mask, sseg = _inputs(case)
    n = case.heads[0]
    rng = np.random.default_rng(1)
    dout = jnp.asarray(rng.standard_normal((B, case.t, n, H), np.float32))
    dlse = jnp.asarray(rng.standard_normal((B, n, case.t), np.float32))

    def naive(xs):
        (q, k, v), sink = _split(case, [x.astype(jnp.float32) for x in xs], sseg)
        return reference.attend_naive(q, k, v, mask(case.q_offset, case.k_offset), sink=sink)

    def truth(xs, dout, dlse):
        (out, lse), vjp = jax.vjp(naive, xs)
        dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)  # rows that see nothing: no lse cotangent
        return (out, lse, vjp((dout, dlse))[0]), (dout, dlse)

    return compile_fast(truth, xs, dout, dlse)(xs, dout, dlse)


def compile_fast(fn, *args):
    """jit-compiled fn for these args. Tiny shapes: compile time dominates, so LLVM optimizes less
    (same semantics, about half the compile time)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def _run(impl: str, case: Case):
    """Compiled forward + vjp of `attend`; returns (out, lse, grads), the naive truth, HLO text."""
    xs, mask, sseg = _inputs(case)
    offs = (jnp.int32(case.q_offset), jnp.int32(case.k_offset))

    def fwd(xs, offs):
        (q, k, v), sink = _split(case, xs, sseg)
        offs = offs if case.traced else (case.q_offset, case.k_offset)
        return attend(q, k, v, mask(*offs), sink=sink, implementation=impl, return_lse=True,
                      block_sizes=case.blocks)

    (out_ref, lse_ref, grads_ref), (dout, dlse) = _truth(case)

    def fwd_and_grads(xs, offs, dout, dlse):
        (out, lse), vjp = jax.vjp(lambda xs: fwd(xs, offs), xs)
        (grads,) = vjp((dout.astype(out.dtype), dlse))
        return out, lse, grads

    with _dispatch.emulate_tpu():
        compiled = compile_fast(fwd_and_grads, xs, offs, dout, dlse)
        got = compiled(xs, offs, dout, dlse)
    return got, (out_ref, lse_ref, grads_ref), compiled.as_text()


def _rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))


def check_case(impl: str, case: Case, kernels: tuple = ()):
    (out, lse, grads), (out_ref, lse_ref, grads_ref), hlo = _run(impl, case)
    tol = TOLERANCE[case.dtype]
    assert out.dtype == jnp.dtype(case.dtype) and lse.dtype == jnp.float32
    assert _rel_err(out, out_ref) <= tol["out"], ("out", _rel_err(out, out_ref))
    seen = np.isfinite(np.asarray(lse_ref))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
    assert np.all(np.asarray(out)[np.transpose(~seen, (0, 2, 1))] == 0)  # rows that see nothing
    lse_err = float(np.max(np.abs(np.asarray(lse)[seen] - np.asarray(lse_ref)[seen])))
    lse_scale = max(1.0, float(np.max(np.abs(np.asarray(lse_ref)[seen]))))
    assert lse_err <= tol["lse"] * lse_scale, lse_err
    names = ["dq", "dk", "dv", "dsink_q", "dsink_k", "dsink_v"]
    for name, g, w in zip(names, grads, grads_ref):
        assert g.dtype == jnp.dtype(case.dtype)
        assert _rel_err(g, w) <= tol["grad"], (name, _rel_err(g, w))
    # the Pallas kernels really ran (a fallback would not name them); xla runs none
    assert _dispatch.kernel_names(hlo) == set(kernels), _dispatch.kernel_names(hlo)


class TestXla:
    """The blockwise jnp reference (the `xla` implementation) on every case."""

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_naive(self, case):
        check_case("xla", case)

    def test_default_blocks(self):
        check_case("xla", dataclasses.replace(CASES[4], blocks=None))


class TestPallasInterpret:
    """The GPU (Triton) kernel bodies run by the Pallas interpreter."""

    kernels = ("jaxllama_flash_fwd_gpu", "jaxllama_flash_dq_gpu", "jaxllama_flash_dkv_gpu")

    @pytest.mark.parametrize("case", [c for c in CASES if c.pallas_gpu], ids=lambda c: c.name)
    def test_matches_naive(self, case):
        check_case("pallas_interpret", case, self.kernels)


class TestPallasTpuInterpreted:
    """The Mosaic TPU kernels under `pltpu.InterpretParams()` (`_dispatch.emulate_tpu`)."""

    kernels = ("jaxllama_flash_fwd_tpu", "jaxllama_flash_dq_tpu", "jaxllama_flash_dkv_tpu")

    @pytest.mark.parametrize("case", [c for c in CASES if c.pallas_tpu], ids=lambda c: c.name)
    def test_matches_naive(self, case):
        check_case("pallas_tpu", case, self.kernels)


# ----------------------------------------------------------------------------- hardware lowering


@pytest.mark.parametrize("platform,custom_call,suffix", [
    ("cuda", "__gpu$xla.gpu.triton", "gpu"), ("tpu", "tpu_custom_call", "tpu")])
def test_kernels_lower_for_their_hardware(platform, custom_call, suffix):
    """Lower forward + backward for the real target from this CPU machine (no device needed):
    the kernel bodies pass the Triton / Mosaic TPU lowering rules and become custom calls. Code
    generation on the device itself (ptxas, Mosaic's layout passes) is not exercised here."""
    impl = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}[platform]
    seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)

    def loss(q, k, v, offset, seg):
        mask = Mask(causal=True, window=64, memory_prefix=16, q_offset=offset,
                    q_segment_ids=seg, kv_segment_ids=seg)
        return attend(q, k, v, mask, implementation=impl).astype(jnp.float32).sum()

    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    resolve = _dispatch.resolve
    try:  # lower as if on the device: only the availability check is bypassed
        _dispatch.resolve = lambda name, op="attention": name
        exported = export.export(fn, platforms=[platform], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(custom_call)])(
            q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), seg)
    finally:
        _dispatch.resolve = resolve
    text = exported.mlir_module()
    assert text.count(custom_call) == 3
    for kernel in ("fwd", "dq", "dkv"):
        assert f"jaxllama_flash_{kernel}_{suffix}" in text


# ----------------------------------------------------------------------------- dispatch


def _tiny():
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((1, 4, 2, 8), np.float32))
    k = jnp.asarray(rng.standard_normal((1, 4, 1, 8), np.float32))
    return q, k, k


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_unavailable_named_implementation_raises(impl):
    with pytest.raises(UnavailableImplementation, match=impl):
        attend(*_tiny(), Mask(), implementation=impl)


def test_unknown_implementation_and_bad_shapes_raise():
    q, k, v = _tiny()
    with pytest.raises(ValueError, match="'cudnn' is not one of"):
        attend(q, k, v, Mask(), implementation="cudnn")
    with pytest.raises(ValueError, match="not a multiple"):
        attend(q[:, :, :1].repeat(3, axis=2), k[:, :, :1].repeat(2, axis=2), v.repeat(2, axis=2),
               Mask())


def test_assert_kernel_ran_tells_kernel_from_fallback():
    q, k, v = _tiny()
    run = lambda impl: lambda q, k, v: attend(q, k, v, Mask(), implementation=impl)
    _dispatch.assert_kernel_ran("jaxllama_flash_fwd_gpu", run("pallas_interpret"), q, k, v)
    with pytest.raises(AssertionError, match="not in the compiled HLO"):
        _dispatch.assert_kernel_ran("jaxllama_flash_fwd_gpu", run("xla"), q, k, v)


def test_auto_picks_by_platform_and_logs_once(caplog):
    _dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="jaxllama.kernels"):
        assert _dispatch.resolve("auto") == "xla"  # CPU
        assert _dispatch.resolve("auto") == "xla"
    assert len([r for r in caplog.records if "'auto'" in r.getMessage()]) == 1
    out = attend(*_tiny(), Mask(), implementation="auto")
    np.testing.assert_allclose(out, attend(*_tiny(), Mask(), implementation="xla"), rtol=0, atol=0)
