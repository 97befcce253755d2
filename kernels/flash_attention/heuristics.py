"""Block sizes per implementation, chosen from the static shapes of a call.

The reference (the `xla` implementation, what the model runs on CPU) trades loop overhead against
memory: each step holds [B, N, block_q, block_k] float32 scores. A decode step (few queries) takes
the key axis in big blocks so it costs what a dense softmax costs, while causal blocks past the
written cache length are still skipped. The Pallas sizes follow the hardware: Triton blocks are
powers of two of at least 16 (its `tl.dot` minimum); Mosaic TPU blocks are multiples of the (8, 128)
vreg tile.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxllama.kernels._common import cdiv, round_up

# Scores held per reference step, in elements per (batch, query head): 256 x 256 float32 = 256 KiB,
# so a step's [B N 256 256] tile stays in cache; on a 2-core CPU 256 x 256 ran a causal T=2048
# prefill (9 heads, head dim 64) about 1.5x faster forward and 1.9x faster forward+backward than
# 512 x 512.
REFERENCE_STEP_ELEMENTS = 256 * 256
REFERENCE_MAX_BLOCK_Q = 256


def _pow2_at_least(x: int, floor: int) -> int:
    p = floor
    while p < x:
        p *= 2
    return p


def _balanced(n: int, block: int, multiple: int = 1) -> int:
    """The smallest block (a multiple of `multiple`) that covers n in as many blocks as `block`."""
    if n <= block:
        return round_up(n, multiple)
    return round_up(cdiv(n, cdiv(n, block)), multiple)


def reference_blocks(t: int, s: int, window: int | None = None) -> tuple[int, int]:
    """(block_q, block_k) for the blockwise jnp reference. Few queries (decode) take the keys in one
    big block; a sliding window caps the key block near the window so skipping pays off."""
    bq = _balanced(t, REFERENCE_MAX_BLOCK_Q)
    bk = max(REFERENCE_STEP_ELEMENTS // bq, 256)
    if window is not None:
        bk = min(bk, max(round_up(window, 128), 256))
    return bq, _balanced(s, bk)


class GpuBlocks(NamedTuple):
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


def gpu_blocks(t: int, s: int, head_dim: int, value_dim: int | None = None,
               backward: bool = False) -> GpuBlocks:
    """Triton tiles for an H100-class GPU: 128 x 64 forward, 64 x 64 backward (the backward holds
    more live tiles per program); fewer queries than a block shrink the query tile (decode). Wide
    heads (MLA: keys 192 or 576 wide, values 128 or 512) take smaller tiles, since the float32
    accumulator [block_q, U] and the key tile [block_k, H] live in registers; these wide-head sizes
    are a starting point, not yet measured on a GPU."""
    wide = max(head_dim, value_dim or head_dim)
    bq = 64 if backward else 128
    bk = 64
    if wide > 128:
        bq = min(bq, 64)
    if wide > 256:
        bq, bk = min(bq, 32), 32
    bq = min(bq, _pow2_at_least(t, 16))
    bk = min(bk, _pow2_at_least(s, 16))
    warps = 8 if wide > 64 and not backward else 4
    return GpuBlocks(bq, bk, warps, 2 if backward else 3)


class TpuBlocks(NamedTuple):
    block_q: int
    block_k: int


# VMEM held per forward step by the stacked query rows (G * block_q of them): the query tile, the
# float32 accumulator and the score tile, [rows, H + U + block_k] at 4 bytes at most. Capped so a
# group of many query heads over one kv head (MLA's absorbed decode: 128 heads, keys 576 wide)
# still fits the default scoped VMEM.
TPU_ROW_BYTES_BUDGET = 16 * 2**20


def tpu_blocks(t: int, s: int, groups: int = 1, head_dim: int = 128,
               value_dim: int | None = None) -> TpuBlocks:
    """Query blocks of up to 512 rows (a multiple of 16: whole bfloat16 sublane tiles), fewer when
    the G stacked heads would overflow `TPU_ROW_BYTES_BUDGET`; key blocks of up to 512 columns (a
    multiple of 128, the lane width)."""
    bk = _balanced(s, 512, 128)
    per_row = 4 * (head_dim + (value_dim or head_dim) + bk)
    max_bq = max(16, TPU_ROW_BYTES_BUDGET // (per_row * groups) // 16 * 16)
    return TpuBlocks(_balanced(t, min(512, max_bq), 16), bk)


# `xla_masked` (masked.py): query rows per chunk (a chunk holds [B N rows S] float32 scores).
MASKED_BLOCK_Q = 512


def masked_block_q(t: int) -> int:
    """Query rows per chunk of the masked implementation: `MASKED_BLOCK_Q`, balanced over t."""
    return _balanced(t, MASKED_BLOCK_Q)


def cpu_masked_attention(t: int, s: int) -> bool:
    """Whether `auto` on CPU runs `xla_masked` for t queries over s keys: exactly where the
    blockwise reference would take one query block and one key block (a decode step, a
    speculative check, a short prompt). There both compute the same products over all S
    columns, and the masked form drops the key-block loop and the online rescaling; on a 2-core
    AVX2 EPYC a one-token step over 2176 slots ran in about 0.3-0.8x the blockwise time, while
    at T = 512-4096 (several blocks) the masked products were 1.1-4.8x slower (BENCHMARKS.md,
    "CPU attention"), so prefills of several blocks keep the blockwise loop."""
    bq, bk = reference_blocks(t, s)
    return t <= bq and s <= bk
