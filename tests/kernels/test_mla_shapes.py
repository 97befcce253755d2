"""MLA in the kernels.

- `mla_decode` (flash-decoding over the latent cache, kernels/flash_attention/decode.py), `xla`
  and `pallas_interpret`, against the naive softmax over the concatenated [latent | rope_k] keys
  with latent values: ragged non-power-of-two widths, DeepSeek's 512 + 64 with 16 heads in
  bfloat16, padded rows and unwritten slots, rows that see nothing, several chunks; the Pallas
  kernel's name is in the compiled HLO (xla's holds none).
- The MLA mixer with `pallas_interpret` == with `xla`: a prefill through `attend` (keys H + R = 12
  wide, values U = 6: padded head pieces) and an absorbed decode step through `mla_decode`.
  Forward only here: interpreting the backward kernels for a whole layer costs minutes.
`attend` itself at MLA's widths (192/128 expanded, 576/512 absorbed, 16 query heads over one kv
head, forward and gradients, both Pallas kernels interpreted) is in test_attention_kernels.py.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxllama.kernels.flash_attention import decode
from jaxllama.kernels.flash_attention.api import Mask
from jaxllama.kernels.flash_attention.reference import attend_naive
from kernel_test_base import KernelTestBase, fresh_normal

from jaxllama.config import KernelConfig, MLAConfig
from jaxllama.mixers.mla_attention import MLACache, MLAttention, MLAttentionConfig


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    n: int
    s: int
    l: int
    r: int
    q_offset: int
    dtype: str = "float32"
    pad: int = 0  # leading padding slots of row 0 (segment id 0)
    lost_row: bool = False  # row 1's query is in a segment no key has
    splits: int | None = None
    block_k: int | None = None


CASES = [
    Case("ragged_f32", 2, 5, 37, 12, 4, 30, pad=3, splits=3, block_k=8),
    Case("deepseek_512_64_h16_bf16", 1, 16, 100, 512, 64, 90, "bfloat16", splits=2,
         block_k=32),
    Case("nothing_seen_f32", 2, 3, 20, 16, 8, 19, lost_row=True, splits=2, block_k=8),
]


def inputs(case: Case):
    ql, qr, lat, rk = fresh_normal(hash(case.name) % 1000, [
        (case.b, case.n, case.l), (case.b, case.n, case.r), (case.b, case.s, case.l),
        (case.b, case.s, case.r)], case.dtype)
    kseg = np.where(np.arange(case.s) <= case.q_offset, 1, 0)[None].repeat(case.b, 0)
    kseg[0, :case.pad] = 0
    qseg = np.ones((case.b,), np.int32)
    if case.lost_row:
        qseg[1] = 7
    return ql, qr, lat, rk, jnp.asarray(qseg, jnp.int32), jnp.asarray(kseg, jnp.int32)


def truth(case: Case, ql, qr, lat, rk, qseg, kseg, scale):
    f = lambda x: x.astype(jnp.float32)
    q = jnp.concatenate([f(ql), f(qr)], -1)[:, None]  # [B 1 N L+R]
    k = jnp.concatenate([f(lat), f(rk)], -1)[:, :, None]  # [B S 1 L+R]
    mask = Mask(causal=True, q_offset=case.q_offset, q_segment_ids=qseg[:, None],
                kv_segment_ids=kseg)
    out, lse = attend_naive(q, k, f(lat)[:, :, None], mask, scale=scale)
    return out[:, 0], lse[:, :, 0]


class DecodeTest(KernelTestBase):
    def check(self, case: Case):
        ql, qr, lat, rk, qseg, kseg = inputs(case)
        scale = 0.3

        def fn(ql, qr, lat, rk, qseg, kseg, off):
            return decode.decode_attend(ql, qr, lat, rk, off, qseg, kseg, scale=scale,
                                        implementation=self.implementation, splits=case.splits,
                                        block_k=case.block_k, return_lse=True)

        (out, lse), compiled = self.run_compiled(fn, ql, qr, lat, rk, qseg, kseg,
                                                 jnp.int32(case.q_offset))
        want_out, want_lse = truth(case, ql, qr, lat, rk, qseg, kseg, scale)
        assert out.shape == (case.b, case.n, case.l)
        self.assert_close("out", out, want_out, case.dtype)
        seen = np.isfinite(np.asarray(want_lse))
        np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
        assert np.all(np.asarray(out, np.float32)[~seen] == 0)
        if case.lost_row:
            assert not seen[1].any() and seen[0].all()
        err = np.max(np.abs(np.asarray(lse)[seen] - np.asarray(want_lse)[seen]))
        assert err <= self.tolerance(case.dtype, "lse") * max(1.0, np.abs(want_lse[seen]).max())
        self.assert_kernels_ran(compiled)


class TestDecodeXla(DecodeTest):
    implementation = "xla"
    kernels = ()

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_naive(self, case):
        self.check(case)

    def test_long_cache_splits(self):
        """4096 slots: the default plan splits the cache into 4 chunks of 1024."""
        assert decode.plan(4096) == (4, 1024, 64)
        self.check(Case("long_4096", 1, 8, 4096, 64, 16, 4000))


class TestDecodePallasInterpret(DecodeTest):
    implementation = "pallas_interpret"
    kernels = ("jaxllama_mla_decode_gpu",)

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_naive(self, case):
        self.check(case)


def test_bad_shapes_and_missing_implementation_raise():
    ql, qr, lat, rk, qseg, kseg = inputs(CASES[0])
    with pytest.raises(ValueError, match="do not fit"):
        decode.decode_attend(ql, qr[:, :, :2], lat, rk, 3, qseg, kseg, scale=1.0,
                             implementation="xla")
    assert not decode.has_implementation("pallas_tpu")
    assert decode.has_implementation("auto") and decode.has_implementation("pallas_gpu")


def test_mla_mixer_through_the_pallas_kernel_matches_xla():
    """One MLA layer (4 heads over 2 kv heads): a 12-token prefill (attend's GPU kernel) and an
    absorbed decode step (`mla_decode`'s kernel) under `pallas_interpret` == under `xla` ==
    the training pass."""
    mla = MLAConfig(num_heads=4, num_kv_heads=2, q_lora_rank=8, kv_lora_rank=8,
                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    cfg = MLAttentionConfig(16, 64, mla)
    (x,) = fresh_normal(5, [(1, 13, 16)], "float32")
    pos = jnp.arange(13)[None]
    params = nn.meta.unbox(MLAttention(cfg).init(jax.random.key(0), x, pos)["params"])
    params = jax.tree.map(lambda a: a * 10, params)  # O(1) outputs

    def run(impl):
        module = MLAttention(cfg, kernels=KernelConfig(attention=impl))

        def f(p):  # prefill 12 tokens (expanded form), then one absorbed decode step
            cache = MLACache.init(cfg, 1, 16, jnp.float32)
            pre, cache = module.apply({"params": p}, x[:, :12], pos[:, :12], cache)
            step, _ = module.apply({"params": p}, x[:, 12:], pos[:, 12:], cache)
            return jnp.concatenate([pre, step], 1)
        return jax.jit(f)(params)

    got, want = run("pallas_interpret"), run("xla")
    full, _ = jax.jit(lambda p: MLAttention(cfg).apply({"params": p}, x, pos))(params)
    base = KernelTestBase()
    assert float(jnp.max(jnp.abs(want))) > 0.1
    base.assert_close("out", got, want, "float32")
    base.assert_close("out", want, full, "float32")
