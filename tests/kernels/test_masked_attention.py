"""The `xla_masked` attention (a few large masked products, kernels/flash_attention/masked.py)
against the naive dense softmax on every case of test_attention_kernels.py (forward, lse and
gradients, float32 and bfloat16, through the kernel test base), with its own query chunking; and
`auto` on CPU choosing it exactly where the blockwise loop would run one block."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jaxllama.kernels.flash_attention import heuristics
from jaxllama.kernels.flash_attention.api import Mask, attend
from test_attention_kernels import CASES, AttentionKernelTest, Case


class TestXlaMasked(AttentionKernelTest):
    """Each case with the static offsets it has (static key slices) and, for the traced cases,
    the `lax.map` path over all S columns; chunks of 8 query rows so ragged tails occur."""

    implementation = "xla_masked"

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_naive(self, case):
        self.check_case(dataclasses.replace(case, blocks=(8, case.blocks[1])))

    def test_traced_offsets_many_chunks(self):
        # 45 rows in chunks of 8: the lax.map path with a padded last chunk
        self.check_case(Case("causal_traced_chunks", 45, 45, (4, 2), traced=True, blocks=(8, 16),
                             q_offset=3, k_offset=3, segments="packed"))


@pytest.mark.parametrize("t,s,masked", [(1, 64, True), (5, 2176, True), (1, 70000, False),
                                        (300, 300, False)],
                         ids=["decode", "speculative_check", "decode_long_cache", "prefill"])
def test_auto_chooses_masked_where_one_block_would_run(t, s, masked):
    """`auto` on CPU lowers to the masked program exactly where the blockwise reference would
    take one query block and one key block, and to the blockwise one otherwise."""
    q = jnp.ones((1, t, 2, 8), jnp.float32)
    k = jnp.ones((1, s, 2, 8), jnp.float32)

    def hlo(impl):
        fn = lambda q, k: attend(q, k, k, Mask(causal=True), implementation=impl)
        return jax.jit(fn).lower(q, k).as_text()

    bq, bk = heuristics.reference_blocks(t, s)
    want = "xla_masked" if t <= bq and s <= bk else "xla"
    assert (want == "xla_masked") == masked
    assert heuristics.cpu_masked_attention(t, s) == (want == "xla_masked")
    assert hlo("auto") == hlo(want)
    assert hlo("xla_masked") != hlo("xla")
