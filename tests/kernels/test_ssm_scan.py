"""Every ssm_scan implementation against the sequential `lax.scan` specification: outputs, final
state and `jax.vjp` gradients of x, dt, A, B, C, D and the initial state (random cotangents on y and
the final state), over ragged lengths (not multiples of the chunk), several chunk sizes, ngroups,
float32 and bfloat16, and packed/padded segment ids. Mamba2 (`ssd_scan`) and Mamba1
(`selective_scan`). Built on kernel_test_base: one test class per implementation; each Pallas case
also proves its kernels ran (names in the compiled HLO)."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jaxllama.kernels import _dispatch
from jaxllama.kernels.ssm_scan import reference
from jaxllama.kernels.ssm_scan.api import UnavailableImplementation, selective_scan, ssd_scan
from kernel_test_base import TOLERANCE, KernelTestBase, compile_fast, fresh_normal

# the final state is a sum over the whole sequence like y; the same bounds apply
SSM_TOLERANCE = {k: {**v, "state": v["out"]} for k, v in TOLERANCE.items()}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    s: int
    heads: int  # H (Mamba2) or channels Dm (Mamba1)
    groups: int
    chunk: int = 16  # Mamba2: the SSD chunk; Mamba1: the kernels' checkpoint spacing
    dtype: str = "float32"
    segments: str | None = None  # packed | left_pad
    d_shape: str = "head"  # Mamba2 D: none | head ([H]) | channel ([H P])
    initial: bool = True
    pallas_gpu: bool = False  # interpret mode is slow: each kernel class runs the marked cases
    pallas_tpu: bool = False
    xla: bool = True  # False: a kernel-only case (its coverage is already in the xla cases)
    b: int = 2
    p: int = 4
    n: int = 8


SSD_CASES = [
    Case("ragged_g1", 37, 4, 1, chunk=16, pallas_gpu=True),
    Case("ragged_g2_chunk8_channel_d", 29, 4, 2, chunk=8, d_shape="channel"),
    Case("g4_bf16", 21, 4, 4, chunk=16, dtype="bfloat16"),
    Case("packed_chunk8", 35, 2, 1, chunk=8, segments="packed"),
    # the TPU interpreter runs each grid program on its own: few (batch, head, chunk) programs
    Case("tpu_g2_chunk8_channel_d", 13, 2, 2, chunk=8, d_shape="channel", b=1, pallas_tpu=True,
         xla=False),
    Case("tpu_packed_bf16", 20, 2, 1, chunk=16, dtype="bfloat16", segments="packed",
         pallas_tpu=True, xla=False),
    Case("left_pad_bf16_no_d", 26, 4, 2, chunk=16, dtype="bfloat16", segments="left_pad",
         d_shape="none", pallas_gpu=True),
    Case("one_chunk_no_initial", 11, 2, 2, chunk=32, initial=False),
    Case("decode_step", 1, 4, 2, chunk=16),
]
SELECTIVE_CASES = [
    # chunk: the Pallas kernels' checkpoint spacing (the xla cases ignore it)
    Case("ragged_g1", 37, 6, 1, chunk=16, pallas_gpu=True),  # Triton pads 6 channels to 8
    Case("left_pad_g3_bf16_no_initial", 21, 6, 3, chunk=8, dtype="bfloat16",
         segments="left_pad", initial=False, pallas_gpu=True),
    Case("packed_g2", 30, 4, 2, chunk=8, segments="packed"),
    # one TPU-interpreted case (each grid program is interpreted on its own: slow); the f32 and
    # second-chunk-size coverage of the shared step math is in the Triton cases above
    Case("tpu_packed_bf16_chunk8", 11, 4, 2, chunk=8, dtype="bfloat16", segments="packed", b=1,
         pallas_tpu=True, xla=False),
    Case("decode_step", 1, 4, 2),
]


def _segment_ids(case: Case):
    b, s = case.b, case.s
    if case.segments == "packed":  # three documents, a padding hole, right padding
        row = np.ones(s, np.int32)
        row[s // 3:] = 2
        row[(2 * s) // 3:] = 3
        row[s // 2] = 0
        row[-3:] = 0
        return np.stack([row, np.roll(np.maximum(row, 1), 2)])[:b]
    if case.segments == "left_pad":
        return np.stack([(np.arange(s) >= k).astype(np.int32) * 5 for k in (0, 6)][:b])
    return None


def _ssd_inputs(case: Case, seed: int):
    b, s, h, g, p, n = case.b, case.s, case.heads, case.groups, case.p, case.n
    x, dt, a, B, C, D, h0, ct_y, ct_f = fresh_normal(seed, [
        (b, s, h, p), (b, s, h), (h,), (b, s, g, n), (b, s, g, n),
        (h, p) if case.d_shape == "channel" else (h,), (b, h, p, n), (b, s, h, p), (b, h, p, n)],
        jnp.float32)
    lo = jnp.dtype(case.dtype)
    xs = {"x": x.astype(lo), "dt": jax.nn.softplus(dt).astype(lo), "A": -jnp.exp(0.5 * a),
          "B": B.astype(lo), "C": C.astype(lo)}
    if case.d_shape != "none":
        xs["D"] = D
    if case.initial:
        xs["initial_state"] = h0
    return xs, (ct_y.astype(lo), ct_f)


def _selective_inputs(case: Case, seed: int):
    b, s, dm, g, n = case.b, case.s, case.heads, case.groups, case.n
    u, delta, a, B, C, D, h0, ct_y, ct_f = fresh_normal(seed, [
        (b, s, dm), (b, s, dm), (dm, n), (b, s, g, n), (b, s, g, n), (dm,), (b, dm, n),
        (b, s, dm), (b, dm, n)], jnp.float32)
    lo = jnp.dtype(case.dtype)
    xs = {"u": u.astype(lo), "delta": jax.nn.softplus(delta).astype(lo), "A": -jnp.exp(0.5 * a),
          "B": B.astype(lo), "C": C.astype(lo), "D": D}
    if case.initial:
        xs["initial_state"] = h0
    return xs, (ct_y.astype(lo), ct_f)


def _fwd_and_grads(fn, seg):
    """(y, final, grads of every input) of fn(**xs, segment_ids=seg) under cotangents cts."""
    def run(xs, cts):
        out, vjp = jax.vjp(lambda xs: fn(**xs, segment_ids=seg), xs)
        return out, vjp(cts)[0]
    return run


def _ssd_spec(x, dt, A, B, C, D=None, initial_state=None, segment_ids=None):
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    return reference.ssd_sequential(f32(x), f32(dt), A, f32(B), f32(C), D, initial_state,
                                    segment_ids)


def _selective_spec(u, delta, A, B, C, D=None, initial_state=None, segment_ids=None):
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    return reference.selective_sequential(f32(u), f32(delta), A, f32(B), f32(C), D,
                                          initial_state, segment_ids)


@functools.cache
def _truth(form: str, case: Case):
    """The specification in float32 on the case's (rounded) inputs: (y, final), grads."""
    inputs = _ssd_inputs if form == "ssd" else _selective_inputs
    spec = _ssd_spec if form == "ssd" else _selective_spec
    xs, cts = inputs(case, seed=hash(case.name) % 1000)
    cts32 = jax.tree.map(lambda a: a.astype(jnp.float32), cts)
    run = _fwd_and_grads(spec, _segment_ids(case))
    return jax.tree.map(np.asarray, compile_fast(run, xs, cts32)(xs, cts32))


class ScanKernelTest(KernelTestBase):
    TOLERANCE = SSM_TOLERANCE

    def check(self, form: str, case: Case):
        inputs = _ssd_inputs if form == "ssd" else _selective_inputs
        xs, cts = inputs(case, seed=hash(case.name) % 1000)
        if form == "selective_chunked":  # the associative form (`xla` off CPU), chunk 8
            fn, form = functools.partial(reference.selective_chunked, chunk_size=8), "selective"
        elif form == "ssd":
            fn = functools.partial(ssd_scan, chunk_size=case.chunk,
                                   implementation=self.implementation)
        else:
            fn = functools.partial(selective_scan, chunk_size=case.chunk,
                                   implementation=self.implementation)
        (got, grads), compiled = self.run_compiled(_fwd_and_grads(fn, _segment_ids(case)), xs,
                                                   cts)
        (want, want_grads) = _truth(form, case)
        self.assert_close("out", got[0], want[0], case.dtype, "y")
        self.assert_close("state", got[1], want[1], jnp.float32, "final_state")
        for k, g in grads.items():
            self.assert_close("grad", g, want_grads[k], xs[k].dtype, f"d{k}")
        self.assert_kernels_ran(compiled)


class TestXla(ScanKernelTest):
    implementation = "xla"

    @pytest.mark.parametrize("case", [c for c in SSD_CASES if c.xla], ids=lambda c: c.name)
    def test_ssd_matches_sequential(self, case):
        self.check("ssd", case)

    # on CPU `xla` runs the sequential form itself: these check the api's plumbing (dtypes,
    # segments, shapes); the chunked form has its own cases below
    @pytest.mark.parametrize("case", SELECTIVE_CASES[:2], ids=lambda c: c.name)
    def test_selective_matches_sequential(self, case):
        self.check("selective", case)

    @pytest.mark.parametrize("case", [c for c in SELECTIVE_CASES if c.xla], ids=lambda c: c.name)
    def test_selective_chunked_matches_sequential(self, case):
        self.check("selective_chunked", case)


SSD_KERNELS = ("state_fwd", "state_bwd", "output_fwd", "output_bwd")
SELECTIVE_KERNELS = ("fwd", "bwd")


class TestPallasInterpret(ScanKernelTest):
    """The Triton kernel bodies in the Pallas interpreter."""

    implementation = "pallas_interpret"
    kernels = tuple(f"jaxllama_ssd_{k}_gpu" for k in SSD_KERNELS)

    @pytest.mark.parametrize("case", [c for c in SSD_CASES if c.pallas_gpu], ids=lambda c: c.name)
    def test_ssd_matches_sequential(self, case):
        self.check("ssd", case)


class TestPallasTpuInterpreted(ScanKernelTest):
    """The Mosaic TPU kernels in the TPU interpreter (`emulate_tpu`)."""

    implementation = "pallas_tpu"
    kernels = tuple(f"jaxllama_ssd_{k}_tpu" for k in SSD_KERNELS)

    @pytest.mark.parametrize("case", [c for c in SSD_CASES if c.pallas_tpu], ids=lambda c: c.name)
    def test_ssd_matches_sequential(self, case):
        self.check("ssd", case)


class TestSelectivePallasInterpret(ScanKernelTest):
    """The Triton Mamba1 kernel bodies in the Pallas interpreter."""

    implementation = "pallas_interpret"
    kernels = tuple(f"jaxllama_selective_{k}_gpu" for k in SELECTIVE_KERNELS)

    @pytest.mark.parametrize("case", [c for c in SELECTIVE_CASES if c.pallas_gpu],
                             ids=lambda c: c.name)
    def test_selective_matches_sequential(self, case):
        self.check("selective", case)


class TestSelectivePallasTpuInterpreted(ScanKernelTest):
    """The Mosaic Mamba1 kernels in the TPU interpreter (`emulate_tpu`)."""

    implementation = "pallas_tpu"
    kernels = tuple(f"jaxllama_selective_{k}_tpu" for k in SELECTIVE_KERNELS)

    @pytest.mark.parametrize("case", [c for c in SELECTIVE_CASES if c.pallas_tpu],
                             ids=lambda c: c.name)
    def test_selective_matches_sequential(self, case):
        self.check("selective", case)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")
class TestPallasGpuNative(ScanKernelTest):
    """The Triton kernels compiled for the GPU, on a GPU only: every Mamba2 case."""

    implementation = "pallas_gpu"
    kernels = tuple(f"jaxllama_ssd_{k}_gpu" for k in SSD_KERNELS)

    @pytest.mark.parametrize("case", [c for c in SSD_CASES if c.chunk >= 16], ids=lambda c: c.name)
    def test_ssd_matches_sequential(self, case):
        self.check("ssd", case)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")
class TestSelectivePallasGpuNative(ScanKernelTest):
    """The Triton Mamba1 kernels compiled for the GPU, on a GPU only: every Mamba1 case."""

    implementation = "pallas_gpu"
    kernels = tuple(f"jaxllama_selective_{k}_gpu" for k in SELECTIVE_KERNELS)

    @pytest.mark.parametrize("case", SELECTIVE_CASES, ids=lambda c: c.name)
    def test_selective_matches_sequential(self, case):
        self.check("selective", case)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (JAX_PLATFORMS=tpu)")
class TestPallasTpuNative(ScanKernelTest):
    """The Mosaic kernels compiled for the TPU, on a TPU only: every Mamba2 case that fits one
    chunk or uses 128-step chunks (the lane rule, pallas_tpu.py)."""

    implementation = "pallas_tpu"
    kernels = tuple(f"jaxllama_ssd_{k}_tpu" for k in SSD_KERNELS)

    @pytest.mark.parametrize("case", [dataclasses.replace(c, chunk=128) for c in SSD_CASES],
                             ids=lambda c: c.name)
    def test_ssd_matches_sequential(self, case):
        self.check("ssd", case)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (JAX_PLATFORMS=tpu)")
class TestSelectivePallasTpuNative(ScanKernelTest):
    """The Mosaic Mamba1 kernels compiled for the TPU, on a TPU only: every Mamba1 case."""

    implementation = "pallas_tpu"
    kernels = tuple(f"jaxllama_selective_{k}_tpu" for k in SELECTIVE_KERNELS)

    @pytest.mark.parametrize("case", SELECTIVE_CASES, ids=lambda c: c.name)
    def test_selective_matches_sequential(self, case):
        self.check("selective", case)


@pytest.mark.parametrize("platform,custom_call,suffix", [
    ("cuda", "__gpu$xla.gpu.triton", "gpu"), ("tpu", "tpu_custom_call", "tpu")])
def test_kernels_lower_for_their_hardware(platform, custom_call, suffix):
    """Forward + backward lowered for the real target from this CPU machine at Mamba2's usual
    head sizes (P 64, N 128, two chunks, ngroups 2, packed segments): the kernel bodies pass the
    Triton / Mosaic TPU lowering rules and become the four custom calls. Code generation on the
    device itself (ptxas, Mosaic's layout passes) is not exercised here."""
    impl = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}[platform]
    b, s, h, p, g, n = 1, 256, 4, 64, 2, 128

    def loss(x, dt, A, B, C, D, h0, seg):
        y, f = ssd_scan(x, dt, A, B, C, D=D, initial_state=h0, segment_ids=seg,
                        implementation=impl)
        return (y.astype(jnp.float32) ** 2).sum() + (f ** 2).sum()

    sds = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype)
    bf16, f32 = jnp.bfloat16, jnp.float32
    args = (sds(bf16, b, s, h, p), sds(bf16, b, s, h), sds(f32, h), sds(bf16, b, s, g, n),
            sds(bf16, b, s, g, n), sds(f32, h), sds(f32, b, h, p, n), sds(jnp.int32, b, s))
    fn = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
    with _dispatch.assume_platform(platform):  # lower as if on the device
        exported = export.export(fn, platforms=[platform], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(custom_call)])(*args)
    text = exported.mlir_module()
    assert text.count(custom_call) == 4
    for kernel in SSD_KERNELS:
        assert f"jaxllama_ssd_{kernel}_{suffix}" in text


@pytest.mark.parametrize("platform,custom_call,suffix", [
    ("cuda", "__gpu$xla.gpu.triton", "gpu"), ("tpu", "tpu_custom_call", "tpu")])
def test_selective_kernels_lower_for_their_hardware(platform, custom_call, suffix):
    """The Mamba1 forward + backward lowered for the real target at Mamba1's usual d_state 16,
    bf16 inputs, 256 channels (several channel blocks on both backends), two B/C groups, four
    chunks, packed segments and an initial state: the two custom calls, on-device code generation
    not exercised (as for the SSD kernels above)."""
    impl = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}[platform]
    b, s, dm, g, n = 1, 256, 512, 2, 16

    def loss(u, dl, A, B, C, D, h0, seg):
        y, f = selective_scan(u, dl, A, B, C, D=D, initial_state=h0, segment_ids=seg,
                              implementation=impl)
        return (y.astype(jnp.float32) ** 2).sum() + (f ** 2).sum()

    sds = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype)
    bf16, f32 = jnp.bfloat16, jnp.float32
    args = (sds(bf16, b, s, dm), sds(bf16, b, s, dm), sds(f32, dm, n), sds(bf16, b, s, g, n),
            sds(bf16, b, s, g, n), sds(f32, dm), sds(f32, b, dm, n), sds(jnp.int32, b, s))
    fn = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
    with _dispatch.assume_platform(platform):
        exported = export.export(fn, platforms=[platform], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(custom_call)])(*args)
    text = exported.mlir_module()
    assert text.count(custom_call) == 2
    for kernel in SELECTIVE_KERNELS:
        assert f"jaxllama_selective_{kernel}_{suffix}" in text


def test_segments_mean_separate_documents():
    """Analytic probe: each packed document equals its own scan from zero (the first one from the
    initial state), padding outputs 0 and leaves the state alone; one compile."""
    case = Case("probe", 24, 2, 1, chunk=8)
    xs, _ = _ssd_inputs(case, 3)
    seg = np.array([[0, 0] + [1] * 7 + [2] * 5 + [0] + [2] * 4 + [3] * 3 + [0, 0]] * 2, np.int32)
    keep = [*range(9, 14), *range(15, 19)]  # document 2 across its padding hole

    def alone(xs, idx, initial=None):
        piece = {k: v[:, idx] for k, v in xs.items() if k in ("x", "dt", "B", "C")}
        return reference.ssd_sequential(**piece, A=xs["A"], D=xs["D"], initial_state=initial)

    def probe(xs):
        packed = ssd_scan(**xs, segment_ids=seg, chunk_size=8, implementation="xla")
        return (packed, alone(xs, np.arange(2, 9), xs["initial_state"]), alone(xs, keep),
                alone(xs, np.arange(19, 22)))

    (y, final), (y1, _), (y2, _), (y3, f3) = compile_fast(probe, xs)(xs)
    np.testing.assert_allclose(y[:, 2:9], y1, atol=1e-5)
    np.testing.assert_allclose(y[:, keep], y2, atol=1e-5)
    np.testing.assert_allclose(y[:, 19:22], y3, atol=1e-5)
    np.testing.assert_allclose(final, f3, atol=1e-5)  # trailing padding keeps the state
    assert np.all(np.asarray(y)[:, [0, 1, 14, 22, 23]] == 0)


def _continued(scan, xs, per_token, cut):
    """scan of the first `cut` tokens, then of the rest from its final state (chunked prefill)."""
    head = {k: v[:, :cut] if k in per_token else v for k, v in xs.items()}
    tail = {k: v[:, cut:] if k in per_token else v for k, v in xs.items()}
    y1, f1 = scan(**head)
    y2, f2 = scan(**{**tail, "initial_state": f1})
    return jnp.concatenate([y1, y2], axis=1), f2


def test_chunked_ssd_any_chunk_size_and_continuation():
    """Chunk sizes that divide, do not divide, and exceed the length give one answer; so does a
    scan continued from the final state of its first part (chunked prefill), both forms."""
    xs, _ = _ssd_inputs(Case("chunks", 27, 4, 2), 5)
    m1, _ = _selective_inputs(Case("chunks1", 27, 4, 2), 6)
    chunks = (1, 4, 9, 27, 64)
    ssd = functools.partial(ssd_scan, chunk_size=4, implementation="xla")
    sel = functools.partial(selective_scan, implementation="xla")

    def run(xs, m1):
        return ([reference.ssd_sequential(**xs)]
                + [reference.ssd_chunked(**xs, chunk_size=c) for c in chunks]
                + [_continued(ssd, xs, ("x", "dt", "B", "C"), 10),
                   reference.selective_sequential(**m1),
                   _continued(sel, m1, ("u", "delta", "B", "C"), 11)])

    (want, want_f), *got, (w1, wf1), (g1, gf1) = compile_fast(run, xs, m1)(xs, m1)
    for name, (y, f) in zip([*chunks, "continued"], got):
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5, err_msg=f"chunk {name}")
        np.testing.assert_allclose(f, want_f, rtol=1e-5, atol=1e-5, err_msg=f"chunk {name}")
    np.testing.assert_allclose(g1, w1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gf1, wf1, rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_names_raise():
    case = Case("bad", 8, 4, 2)
    xs, _ = _ssd_inputs(case, 1)
    with pytest.raises(ValueError, match="4 heads are not a multiple of 3 B/C groups"):
        ssd_scan(**{**xs, "B": xs["B"][:, :, :1].repeat(3, 2), "C": xs["C"][:, :, :1].repeat(3, 2)})
    with pytest.raises(ValueError, match=r"dt has shape \(2, 8, 3\)"):
        ssd_scan(**{**xs, "dt": xs["dt"][..., :3]})
    with pytest.raises(ValueError, match="initial_state has shape"):
        ssd_scan(**{**xs, "initial_state": xs["initial_state"][:, :2]})
    with pytest.raises(ValueError, match="'cudnn' is not one of"):
        ssd_scan(**xs, implementation="cudnn")
    with pytest.raises(UnavailableImplementation, match="needs a CUDA GPU|has no implementation"):
        ssd_scan(**xs, implementation="pallas_gpu")
    with pytest.raises(UnavailableImplementation, match="needs a TPU|has no implementation"):
        ssd_scan(**xs, implementation="pallas_tpu")
    m1, _ = _selective_inputs(Case("bad1", 8, 4, 2), 1)
    with pytest.raises(ValueError, match=r"A has shape \(4, 7\)"):
        selective_scan(**{**m1, "A": m1["A"][:, :7]})


def test_auto_per_platform_and_named_never_falls_back(caplog):
    """`auto` reads the op's table (xla on CPU, the platform's kernels on GPU/TPU) for both forms
    and logs its choice once per platform; a named implementation runs its own kernels or raises
    (checked above and in test_bad_shapes_and_names_raise)."""
    assert _dispatch.resolve("auto", "ssm_scan") == "xla"
    with _dispatch.assume_platform("gpu"):
        assert _dispatch.resolve("auto", "ssm_scan") == "pallas_gpu"
    with _dispatch.assume_platform("tpu"):
        assert _dispatch.resolve("auto", "ssm_scan") == "pallas_tpu"
    m1, _ = _selective_inputs(Case("auto", 5, 2, 1), 2)
    with pytest.raises(ValueError, match="chunk_size a power of two >= 16"):
        ssd_scan(**_ssd_inputs(Case("c", 8, 2, 1), 1)[0], chunk_size=8,
                 implementation="pallas_interpret")
    with pytest.raises(ValueError, match="selective_scan: chunk_size must be positive"):
        selective_scan(**m1, chunk_size=0, implementation="pallas_interpret")
    _dispatch._logged.discard(("ssm_scan", "gpu"))
    with caplog.at_level(logging.INFO, logger="jaxllama.kernels"), \
            _dispatch.assume_platform("gpu"):
        for _ in range(2):  # traced only: the Triton kernel cannot run on this CPU
            jaxpr = str(jax.make_jaxpr(lambda m: selective_scan(**m))(m1))
            assert "jaxllama_selective_fwd_gpu" in jaxpr
    lines = [r.getMessage() for r in caplog.records if "'auto' on platform 'gpu'" in r.getMessage()]
    assert len(lines) == 1, lines
