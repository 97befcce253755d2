"""Every attention implementation against the naive dense softmax: output, log-sum-exp and `jax.vjp`
gradients (dq, dk, dv and the extra columns' q, k, v, with a cotangent on the lse too), for every
mask kind and both extra-column rules (lambda sinks `beyond_window`, FoT memory `always`), float32
and bfloat16, ragged lengths, GQA group sizes 1 to 16, and value head dims different from the key
head dim (MLA: 192/128 expanded, 576/512 absorbed with many query heads over one kv head). Each
Pallas case also proves its kernels ran (their names in the compiled HLO). Built on
kernel_test_base: one test class per implementation; interpret mode is slow, so the Pallas classes
run the cases marked for them (each kind and dtype still covered)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jaxllama.kernels import _dispatch
from jaxllama.kernels._common import merge_partials
from jaxllama.kernels.flash_attention import reference
from jaxllama.kernels.flash_attention.api import (
    ALWAYS,
    BEYOND_WINDOW,
    ExtraColumns,
    Mask,
    UnavailableImplementation,
    attend,
    attend_backward,
)
from jaxllama.kernels.flash_attention.pallas_gpu import head_pieces
from kernel_test_base import KernelTestBase, compile_fast, fresh_normal


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    t: int
    s: int
    heads: tuple  # (N, K): group size N // K
    dtype: str = "float32"
    causal: bool = True
    window: int | None = None
    q_offset: int = 0
    k_offset: int = 0
    traced: bool = False  # offsets are jit arguments
    segments: str | None = None  # packed | cache | mismatch
    extra: int = 0  # extra key columns; -1: every token one (packed lambda)
    visibility: str = BEYOND_WINDOW  # of the extra columns
    own_q: bool = True  # the extra columns have their own queries (lambda) or use q (FoT)
    blocks: tuple = (16, 16)
    b: int = 2
    h: int = 16  # key head dim
    u: int | None = None  # value head dim (None: h)
    pallas_gpu: bool = True
    pallas_tpu: bool = False

    @property
    def value_dim(self) -> int:
        return self.u or self.h


CASES = [
    Case("causal_g1_ragged", 19, 19, (2, 2), pallas_tpu=True),
    Case("causal_g4_bf16", 21, 21, (4, 1), "bfloat16"),
    Case("window_g8", 37, 37, (8, 1), window=5, blocks=(16, 8)),
    Case("window_g1_bf16", 40, 40, (2, 2), "bfloat16", window=9, pallas_tpu=True),
    Case("lambda_sinks_g4", 35, 35, (4, 1), window=6, extra=3, pallas_tpu=True),
    Case("lambda_packed_bf16", 30, 30, (2, 2), "bfloat16", window=4, segments="packed", extra=-1),
    Case("segments_packed_g4_bf16", 33, 33, (4, 1), "bfloat16", segments="packed",
         pallas_tpu=True),
    # FoT: a window over the local keys plus 6 memory slots visible to every query of the row's
    # first document (the last 2 slots unwritten, segment id 0), the ordinary q reads them
    Case("fot_memory_always", 20, 20, (2, 2), window=7, segments="packed", extra=6,
         visibility=ALWAYS, own_q=False, pallas_tpu=True),
    Case("chunked_prefill_traced", 6, 30, (4, 1), q_offset=17, traced=True, segments="cache",
         pallas_tpu=True),
    Case("decode_traced_g8_bf16", 1, 40, (8, 1), "bfloat16", q_offset=23, traced=True,
         segments="cache"),
    Case("bidirectional_empty_rows", 18, 23, (2, 2), causal=False, segments="mismatch",
         k_offset=5, blocks=(8, 16), pallas_gpu=False),
    Case("ring_block_offsets_bf16", 16, 16, (4, 1), "bfloat16", q_offset=16, k_offset=0,
         blocks=(8, 8), pallas_gpu=False),
    # MLA, expanded form: keys 192 wide (128 nope + 64 rope), values 128
    Case("mla_expanded_h192_u128", 19, 19, (4, 2), h=192, u=128, b=1, pallas_tpu=True),
    # MLA, absorbed decode: 16 query heads over ONE latent kv head, keys 576, values 512
    Case("mla_absorbed_h576_u512_bf16", 2, 24, (16, 1), "bfloat16", q_offset=22, traced=True,
         segments="cache", h=576, u=512, b=1, pallas_tpu=True),
]


def _segment_ids(case: Case, rng):
    if case.segments == "packed":
        ids = np.sort(rng.integers(1, 4, (case.b, case.t)), axis=1).astype(np.int32)
        return ids, ids
    if case.segments == "cache":  # slots at or past the written length are empty (id 0)
        kv = (np.arange(case.s) < case.q_offset + case.t).astype(np.int32)
        return np.ones((case.b, case.t), np.int32), np.repeat(kv[None], case.b, 0)
    if case.segments == "mismatch":  # rows of segment 3 see no key at all
        return (rng.integers(1, 4, (case.b, case.t)).astype(np.int32),
                rng.integers(1, 3, (case.b, case.s)).astype(np.int32))
    return None, None


def _extra_segment_ids(case: Case, qseg):
    if qseg is None or not case.extra:
        return None
    if case.visibility == ALWAYS:  # memory of the row's first document; the last 2 slots unwritten
        written = np.arange(case.extra) < case.extra - 2
        return np.where(written, qseg[:, :1], 0).astype(np.int32)
    # packed lambda: the first 2 tokens of each segment are sinks, the rest id -1
    first = np.concatenate([np.ones((case.b, 1), bool), qseg[:, 1:] != qseg[:, :-1]], 1)
    start = np.maximum.accumulate(np.where(first, np.arange(case.t), 0), axis=1)
    return np.where(np.arange(case.t) - start < 2, qseg, -1).astype(np.int32)


def _inputs(case: Case, seed: int = 0):
    """Differentiable inputs [q, k, v(, extra q), extra k, extra v], the mask builder and the
    extra columns' segment ids."""
    (n, kh), b, h, u = case.heads, case.b, case.h, case.value_dim
    shapes = [(b, case.t, n, h), (b, case.s, kh, h), (b, case.s, kh, u)]
    if case.extra:
        m = case.t if case.extra < 0 else case.extra
        shapes += ([(b, case.t, n, h)] if case.own_q else []) + [(b, m, kh, h), (b, m, kh, u)]
    xs = fresh_normal(seed, shapes, case.dtype)
    qseg, kseg = _segment_ids(case, np.random.default_rng(seed + 100))
    eseg = _extra_segment_ids(case, qseg)

    def mask(q_offset, k_offset):
        return Mask(causal=case.causal, window=case.window, q_offset=q_offset, k_offset=k_offset,
                    q_segment_ids=qseg, kv_segment_ids=kseg)

    return xs, mask, eseg


def _split(case, xs, eseg):
    """(q, k, v), ExtraColumns or None."""
    if not case.extra:
        return xs[:3], None
    eq = xs[3] if case.own_q else None
    ek, ev = xs[-2:]
    return xs[:3], ExtraColumns(ek, ev, case.visibility, q=eq, segment_ids=eseg)


def _cotangents(case: Case):
    n = case.heads[0]
    return fresh_normal(1, [(case.b, case.t, n, case.value_dim), (case.b, n, case.t)], "float32")


@functools.cache
def _truth(case: Case):
    """The naive float32 softmax's (out, lse, grads) and the cotangents (dout, dlse) used."""
    xs, mask, eseg = _inputs(case)
    dout, dlse = _cotangents(case)

    def naive(xs):
        (q, k, v), extra = _split(case, [x.astype(jnp.float32) for x in xs], eseg)
        return reference.attend_naive(q, k, v, mask(case.q_offset, case.k_offset), extra=extra)

    def truth(xs, dout, dlse):
        (out, lse), vjp = jax.vjp(naive, xs)
        dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)  # rows that see nothing: no lse cotangent
        return (out, lse, vjp((dout, dlse))[0]), (dout, dlse)

    return compile_fast(truth, xs, dout, dlse)(xs, dout, dlse)


class AttentionKernelTest(KernelTestBase):
    """`attend` of one implementation against the naive truth, forward and gradients."""

    def check_case(self, case: Case):
        xs, mask, eseg = _inputs(case)
        offs = (jnp.int32(case.q_offset), jnp.int32(case.k_offset))
        (out_ref, lse_ref, grads_ref), (dout, dlse) = _truth(case)

        def fwd_and_grads(xs, offs, dout, dlse):
            def fwd(xs):
                (q, k, v), extra = _split(case, xs, eseg)
                o = offs if case.traced else (case.q_offset, case.k_offset)
                return attend(q, k, v, mask(*o), extra=extra, implementation=self.implementation,
                              return_lse=True, block_sizes=case.blocks)

            (out, lse), vjp = jax.vjp(fwd, xs)
            (grads,) = vjp((dout.astype(out.dtype), dlse))
            return out, lse, grads

        (out, lse, grads), compiled = self.run_compiled(fwd_and_grads, xs, offs, dout, dlse)
        assert out.shape == out_ref.shape and lse.dtype == jnp.float32
        self.assert_close("out", out, out_ref, case.dtype)
        seen = np.isfinite(np.asarray(lse_ref))
        np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
        assert np.all(np.asarray(out)[np.transpose(~seen, (0, 2, 1))] == 0)  # rows that see nothing
        lse_err = float(np.max(np.abs(np.asarray(lse)[seen] - np.asarray(lse_ref)[seen])))
        lse_scale = max(1.0, float(np.max(np.abs(np.asarray(lse_ref)[seen]))))
        assert lse_err <= self.tolerance(case.dtype, "lse") * lse_scale, lse_err
        names = ["dq", "dk", "dv"] + (["dextra_q"] if case.extra and case.own_q else []) + [
            "dextra_k", "dextra_v"]
        for name, g, w in zip(names, grads, grads_ref, strict=False):
            self.assert_close("grad", g, w, case.dtype, name)
        self.assert_kernels_ran(compiled)


class TestXla(AttentionKernelTest):
    """The blockwise jnp reference (the `xla` implementation) on every case."""

    implementation = "xla"

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_naive(self, case):
        self.check_case(case)

    def test_default_blocks(self):
        self.check_case(dataclasses.replace(CASES[4], blocks=None))


class TestPallasInterpret(AttentionKernelTest):
    """The GPU (Triton) kernel bodies run by the Pallas interpreter."""

    implementation = "pallas_interpret"
    kernels = ("jaxllama_flash_fwd_gpu", "jaxllama_flash_dq_gpu", "jaxllama_flash_dkv_gpu")

    @pytest.mark.parametrize("case", [c for c in CASES if c.pallas_gpu], ids=lambda c: c.name)
    def test_matches_naive(self, case):
        self.check_case(case)


class TestPallasTpuInterpreted(AttentionKernelTest):
    """The Mosaic TPU kernels under `pltpu.InterpretParams()` (`_dispatch.emulate_tpu`)."""

    implementation = "pallas_tpu"
    kernels = ("jaxllama_flash_fwd_tpu", "jaxllama_flash_dq_tpu", "jaxllama_flash_dkv_tpu")

    @pytest.mark.parametrize("case", [c for c in CASES if c.pallas_tpu], ids=lambda c: c.name)
    def test_matches_naive(self, case):
        self.check_case(case)


def test_gpu_head_pieces_are_powers_of_two_without_extra_padding():
    """Triton tiles must be powers of two; a head dim is split into such pieces instead of being
    padded to the next power of two (576 = 512 + 64, not 1024); only a dim below a multiple of 16
    (tl.dot's minimum) is padded, to that multiple."""
    assert head_pieces(128) == ((0, 128),)
    assert head_pieces(192) == ((0, 128), (128, 64))
    assert head_pieces(576) == ((0, 512), (512, 64))
    assert head_pieces(80) == ((0, 64), (64, 16))
    assert head_pieces(8) == ((0, 16),)
    for d in range(1, 700):
        pieces = head_pieces(d)
        assert all(size & (size - 1) == 0 and size >= 16 for _, size in pieces)
        assert [off for off, _ in pieces] == list(np.cumsum([0] + [s for _, s in pieces])[:-1])
        assert sum(size for _, size in pieces) == -(-d // 16) * 16


# ----------------------------------------------------------------------------- hardware lowering


@pytest.mark.parametrize("platform,custom_call,suffix", [
    ("cuda", "__gpu$xla.gpu.triton", "gpu"), ("tpu", "tpu_custom_call", "tpu")])
@pytest.mark.parametrize("h,u,heads", [(192, 128, (4, 2)), (576, 512, (16, 1))],
                         ids=["h192_u128", "h576_u512"])
def test_kernels_lower_for_their_hardware(platform, custom_call, suffix, h, u, heads):
    """Lower forward + backward for the real target from this CPU machine (no device needed):
    the kernel bodies pass the Triton / Mosaic TPU lowering rules (Triton: every tile a power of
    two) and become custom calls, for the ordinary columns and an `always` extra set (FoT memory)
    at MLA's head dims. Code generation on the device itself (ptxas, Mosaic's layout passes) is
    not exercised here."""
    impl = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}[platform]
    (n, kh), t, m = heads, 128, 64
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
    mem_seg = jax.ShapeDtypeStruct((1, m), jnp.int32)

    def loss(q, k, v, mk, mv, offset, seg, mem_seg):
        mask = Mask(causal=True, window=64, q_offset=offset, q_segment_ids=seg,
                    kv_segment_ids=seg)
        extra = ExtraColumns(mk, mv, ALWAYS, segment_ids=mem_seg)
        return attend(q, k, v, mask, extra=extra, implementation=impl).astype(jnp.float32).sum()

    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    args = (bf16(1, t, n, h), bf16(1, t, kh, h), bf16(1, t, kh, u), bf16(1, m, kh, h),
            bf16(1, m, kh, u), jax.ShapeDtypeStruct((), jnp.int32), seg, mem_seg)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    with _dispatch.assume_platform(platform):  # lower as if on the device
        exported = export.export(fn, platforms=[platform], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(custom_call)])(*args)
    text = exported.mlir_module()
    assert text.count(custom_call) == 6  # fwd, dq, dkv for each of the two column sets
    for kernel in ("fwd", "dq", "dkv"):
        assert f"jaxllama_flash_{kernel}_{suffix}" in text


# ----------------------------------------------------------------------------- api checks


def _tiny():
    q, k = fresh_normal(5, [(1, 4, 2, 8), (1, 4, 1, 8)], "float32")
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
    with pytest.raises(ValueError, match="do not match"):  # values of another length
        attend(q, k, v[:, :3], Mask())
    with pytest.raises(ValueError, match="extra columns"):  # extra values of another head dim
        attend(q, k, v, Mask(), extra=ExtraColumns(k, v[..., :4], ALWAYS))
    with pytest.raises(ValueError, match="visibility"):
        attend(q, k, v, Mask(), extra=ExtraColumns(k, v, "sometimes"))
    with pytest.raises(ValueError, match="need mask.q_segment_ids"):
        attend(q, k, v, Mask(), extra=ExtraColumns(k, v, ALWAYS,
                                                   segment_ids=jnp.ones((1, 4), jnp.int32)))


def test_value_head_dim_differs_from_key_head_dim():
    """out takes the value head dim: [B T N U] from v [B S K U], here U = 3 != H = 8."""
    q, k, _ = _tiny()
    v = fresh_normal(6, [(1, 4, 1, 3)], "float32")[0]
    out = jax.jit(lambda q, k, v: attend(q, k, v, Mask(), implementation="xla"))(q, k, v)
    assert out.shape == (1, 4, 2, 3)
    want, _ = reference.attend_naive(q, k, v, Mask())
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_merge_partials_is_attention_over_the_union():
    """Two disjoint key sets merged by log-sum-exp == one softmax over both; a row that sees
    nothing in one set takes the other's result, and in neither gets output 0 and lse -inf."""
    q, k, v = fresh_normal(7, [(1, 3, 2, 8), (1, 6, 1, 8), (1, 6, 1, 5)], "float32")
    seg_q = jnp.array([[1, 2, 3]], jnp.int32)
    seg_k = jnp.array([[1, 1, 2, 2, 1, 1]], jnp.int32)  # segment 3 sees no key; 2 only the first set
    mask = lambda lo, hi: Mask(causal=False, q_segment_ids=seg_q, kv_segment_ids=seg_k[:, lo:hi])
    want, want_lse = reference.attend_naive(q, k, v, mask(0, 6))
    a = reference.attend_naive(q, k[:, :4], v[:, :4], mask(0, 4))
    b = reference.attend_naive(q, k[:, 4:], v[:, 4:], mask(4, 6))
    out, lse = merge_partials(*a, *b)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(want_lse)))
    assert np.isinf(np.asarray(b[1])[0, :, 1]).all() and np.isinf(np.asarray(lse)[0, :, 2]).all()
    seen = np.isfinite(np.asarray(want_lse))
    np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(want_lse)[seen], rtol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "xla_masked", "pallas_interpret"])
def test_attend_backward_of_disjoint_sets_sums_to_the_union_gradient(impl):
    """Ring attention's backward: each key set's `attend_backward` against the merged output and
    lse, summed, equals the gradient of one softmax over the union (a causal prefix-and-diagonal
    split as a ring step makes it; GQA; a row that sees nothing in the first set)."""
    q, k, v, dout = fresh_normal(8, [(1, 5, 4, 8), (1, 9, 2, 8), (1, 9, 2, 6), (1, 5, 4, 6)],
                                 "float32")
    q_seg = jnp.array([[1, 1, 2, 2, 2]], jnp.int32)
    k_seg = jnp.array([[1, 1, 1, 1, 1, 1, 2, 2, 2]], jnp.int32)
    union = Mask(causal=True, q_offset=4, q_segment_ids=q_seg, kv_segment_ids=k_seg)
    out, vjp = jax.vjp(lambda q, k, v: reference.attend_naive(q, k, v, union)[0], q, k, v)
    want = vjp(dout)
    lse = reference.attend_naive(q, k, v, union)[1]
    prefix = Mask(causal=False, q_segment_ids=q_seg, kv_segment_ids=k_seg[:, :4])  # keys 0..3
    diag = Mask(causal=True, q_segment_ids=q_seg, kv_segment_ids=k_seg[:, 4:])  # keys 4..8

    def grads(q, k, v, out, lse, dout):
        a = attend_backward(q, k[:, :4], v[:, :4], prefix, out, lse, dout, implementation=impl)
        b = attend_backward(q, k[:, 4:], v[:, 4:], diag, out, lse, dout, implementation=impl)
        return a[0] + b[0], jnp.concatenate([a[1], b[1]], 1), jnp.concatenate([a[2], b[2]], 1)

    got = jax.jit(grads)(q, k, v, out, lse, dout)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.float32 and g.shape == w.shape, name
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err < 3e-5, f"{name}: max|diff|/max|want| {err:.1e}"


def test_assert_kernel_ran_tells_kernel_from_fallback():
    q, k, v = _tiny()
    run = lambda impl: lambda q, k, v: attend(q, k, v, Mask(), implementation=impl)
    _dispatch.assert_kernel_ran("jaxllama_flash_fwd_gpu", run("pallas_interpret"), q, k, v)
    with pytest.raises(AssertionError, match="not in the compiled HLO"):
        _dispatch.assert_kernel_ran("jaxllama_flash_fwd_gpu", run("xla"), q, k, v)
