"""Attention masks against literal 0/1 matrices, the block tables every implementation uses to skip
work against brute force, and an analytic probe: a token never sees another segment."""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxllama.kernels.flash_attention.api import ALWAYS, BEYOND_WINDOW, ExtraColumns, Mask, attend
from jaxllama.kernels.flash_attention.mask import (
    Columns,
    dense_mask,
    extra_columns,
    extra_mask,
    kv_block_ranges,
    ordinary_columns,
    q_block_ranges,
    segment_ranges,
    visible,
)


def lit(rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in r] for r in rows.split()], bool)


LITERALS = [
    (Mask(causal=True), 4, 4, lit("1000 1100 1110 1111")),
    (Mask(causal=True, window=2), 4, 4, lit("1000 1100 0110 0011")),
    (Mask(causal=False, window=2), 3, 4, lit("1111 1111 0111")),
    # query rows at positions 2, 3 (chunked prefill) over keys 0..4
    (Mask(causal=True, q_offset=2), 2, 5, lit("11100 11110")),
    # keys from position -2 (k_offset), window 2
    (Mask(causal=True, window=2, k_offset=-2), 4, 6, lit("011000 001100 000110 000011")),
]


@pytest.mark.parametrize("mask,t,s,want", LITERALS)
def test_dense_mask_and_column_rule_match_literals(mask, t, s, want):
    np.testing.assert_array_equal(np.asarray(dense_mask(mask, t, s)[0]), want)
    got = visible(ordinary_columns(mask), jnp.asarray(mask.q_offset) + jnp.arange(t)[:, None],
                  jnp.arange(s)[None, :], mask.k_offset, s)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_segments_and_extra_columns_match_literals():
    seg = jnp.array([[1, 1, 2, 2]])
    mask = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(dense_mask(mask, 4, 4)[0]),
                                  lit("1000 1100 0010 0011"))
    # lambda: 2 sinks, window 2 -> sink g visible iff q_pos - g >= 2
    sink = ExtraColumns(k=jnp.zeros((1, 2, 1, 1)), v=None, visibility=BEYOND_WINDOW)
    want = lit("00 00 10 11 11")
    np.testing.assert_array_equal(np.asarray(extra_mask(Mask(window=2), sink, 5)[0]), want)
    cols = extra_columns(Mask(window=2), sink)
    got = visible(cols, jnp.arange(5)[:, None], jnp.arange(2)[None, :], 0, 2)
    np.testing.assert_array_equal(np.asarray(got), want)
    # FoT memory: 3 slots visible to every query whatever its position or window, subject only
    # to segment ids (slot 2 unwritten: id 0)
    mem = ExtraColumns(k=jnp.zeros((1, 3, 1, 1)), v=None, visibility=ALWAYS,
                       segment_ids=jnp.array([[1, 2, 0]]))
    mask = Mask(causal=True, window=1, q_offset=7, q_segment_ids=seg, kv_segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(extra_mask(mask, mem, 4)[0]),
                                  lit("100 100 010 010"))
    got = visible(extra_columns(mask, mem), 7 + jnp.arange(4)[:, None], jnp.arange(3)[None, :],
                  0, 3)
    np.testing.assert_array_equal(np.asarray(got), np.ones((4, 3), bool))
    assert extra_columns(mask, mem).segments


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _tables_and_entries(cols, qo, ko, t, bq, s, bk):
    """For a batch of traced offsets: visibility [T S] and both block tables."""
    def one(qo, ko):
        ok = visible(cols, qo + jnp.arange(t)[:, None], jnp.arange(s)[None, :], ko, s)
        return (ok, kv_block_ranges(cols, qo, ko, t, bq, s, bk),
                q_block_ranges(cols, qo, ko, t, bq, s, bk))
    return jax.vmap(one)(qo, ko)


COLUMN_SETS = [Columns(True, 0, None, False), Columns(True, 0, 5, False),
               Columns(False, 0, 4, False), Columns(True, 3, None, False),
               Columns(True, 2, 3, False), Columns(False, 0, None, False)]


@pytest.mark.parametrize("cols", COLUMN_SETS)
def test_block_tables_cover_every_visible_entry_once(cols):
    """Against brute force over the element rule, with random offsets and ragged sizes."""
    rng = np.random.default_rng(0)
    for t, s, bq, bk in [(7, 19, 4, 8), (16, 5, 8, 3)]:
        offsets = rng.integers(0, 12, 32, dtype=np.int32), rng.integers(-6, 6, 32, dtype=np.int32)
        oks, (los, his), (qlos, qhis) = jax.tree.map(
            np.asarray, _tables_and_entries(cols, *offsets, t, bq, s, bk))
        for ok, lo, hi, qlo, qhi in zip(oks, los, his, qlos, qhis):
            need = {(r // bq, c // bk) for r, c in zip(*np.nonzero(ok))}
            visited = {(i, j) for i in range(len(lo)) for j in range(lo[i], hi[i])}
            assert need <= visited
            assert need <= {(i, j) for j in range(len(qlo)) for i in range(qlo[j], qhi[j])}
            # and tight: every visited block holds a visible entry of its query block
            assert visited <= need


def test_segment_ranges():
    ids = jnp.array([[1, 1, 1, 2, 2, 3, 3]])
    lo, hi = segment_ranges(ids, 3)
    np.testing.assert_array_equal(np.asarray(lo), [[1, 2, 3]])
    np.testing.assert_array_equal(np.asarray(hi), [[1, 3, 3]])


def test_token_never_sees_another_segment():
    """Perturbing keys/values of segment 2 leaves every segment-1 output unchanged (and changes
    segment 2's), for packed causal attention with block sizes that straddle the boundary."""
    rng = np.random.default_rng(3)
    q, k, v, noise = (rng.standard_normal((1, 24, 2, 8), np.float32) for _ in range(4))
    seg = np.array([[1] * 10 + [2] * 14], np.int32)
    mask = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    bump = np.where(seg[..., None, None] == 2, noise, 0.0).astype(np.float32)
    run = jax.jit(lambda k, v: attend(q, k, v, mask, implementation="xla", block_sizes=(8, 8)))
    base, moved = run(k, v), run(k + bump, v + bump)
    np.testing.assert_array_equal(np.asarray(base[:, :10]), np.asarray(moved[:, :10]))
    assert float(jnp.max(jnp.abs(base[:, 10:] - moved[:, 10:]))) > 1e-3
