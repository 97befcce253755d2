"""Chunk sizes per implementation, chosen from the static shapes of a call.

The chunked SSD's intra-chunk term holds [B C L L H] float32 weights in the reference (one L x L
tile per head and chunk in a kernel), and its inter-chunk recurrence takes S / L sequential steps:
a longer chunk trades quadratic work for fewer sequential steps. Mamba2's published default is 256.
Pallas tiles follow the hardware: Triton blocks are powers of two of at least 16 (its `tl.dot`
minimum); Mosaic TPU blocks are multiples of the 8-row sublane tile (128 preferred, the lane width,
since the L x L tile's columns lie on lanes).

Mamba1's kernels (pallas_selective.py) walk the sequence one step at a time; their chunk is only
the checkpoint spacing of the backward (S / L stored states, an [L N br] recompute workspace), and
their channel block `br` sets the program count and the on-chip state [N br]: Triton blocks are
powers of two (padding the group width up to a multiple), Mosaic blocks the whole group or a
multiple of the 128-lane width.
"""

from __future__ import annotations

from jaxllama.kernels._common import round_up

REFERENCE_SSD_CHUNK = 64  # [B C 64 64 H] float32 weights: small beside the [B S H P] activations
REFERENCE_SELECTIVE_CHUNK = 128  # Mamba1: [B 128 Dm N] float32 held per associative-scan chunk
GPU_SSD_CHUNK = 64
TPU_SSD_CHUNK = 128
SELECTIVE_CHUNK = 64  # both backends: S / 64 checkpoints, a [64 N br] workspace
GPU_SELECTIVE_BLOCK = 64  # channels per Triton program: a [16 64] float32 state at d_state 16
TPU_SELECTIVE_BLOCK = 128  # one lane width: [L 1 128] tiles (sublane-padded to 8) in VMEM


def _pow2_at_least(x: int, floor: int) -> int:
    p = floor
    while p < x:
        p *= 2
    return p


def reference_ssd_chunk(s: int) -> int:
    """A short call (decode, small prefill) takes one chunk of its own length (a multiple of 8)."""
    return min(REFERENCE_SSD_CHUNK, round_up(s, 8))


def reference_selective_chunk(s: int) -> int:
    return min(REFERENCE_SELECTIVE_CHUNK, s)


def reference_selective_sequential(platform: str) -> bool:
    """Whether the `xla` Mamba1 scan runs the sequential recurrence rather than the chunked
    associative scan. On a CPU the associative scan's log2(L) sweeps over [B L Dm N] cost more than
    they parallelize (measured slower forward and backward: BENCHMARKS.md, selective scans);
    elsewhere (a GPU/TPU without the kernel) its parallel depth pays."""
    return platform == "cpu"


def gpu_ssd_chunk(s: int) -> int:
    """A power of two of at least 16 (Triton tiles), at most `GPU_SSD_CHUNK`."""
    return min(GPU_SSD_CHUNK, _pow2_at_least(s, 16))


def tpu_ssd_chunk(s: int) -> int:
    """A multiple of 8 (sublanes), at most `TPU_SSD_CHUNK`."""
    return min(TPU_SSD_CHUNK, round_up(s, 8))


def selective_chunk(s: int) -> int:
    """The Mamba1 kernels' checkpoint spacing: `SELECTIVE_CHUNK`, or the whole of a short call."""
    return min(SELECTIVE_CHUNK, s)


def gpu_selective_block(r: int) -> tuple[int, int]:
    """(block, padded group width) for a B/C group of r channels on Triton: a power of two of at
    most `GPU_SELECTIVE_BLOCK`, the width zero-padded up to a multiple of it."""
    br = min(GPU_SELECTIVE_BLOCK, _pow2_at_least(r, 1))
    return br, round_up(r, br)


def tpu_selective_block(r: int) -> tuple[int, int]:
    """(block, group width) on Mosaic: the whole group unless it is a multiple of 128 lanes, then
    the largest multiple of 128 of at most `TPU_SELECTIVE_BLOCK` that divides it (no padding)."""
    if r % 128:
        return r, r
    cap = max(128, TPU_SELECTIVE_BLOCK)
    return max(m for m in range(128, cap + 1, 128) if r % m == 0), r
