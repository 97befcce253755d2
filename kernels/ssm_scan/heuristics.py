"""Chunk sizes per implementation, chosen from the static shapes of a call.

The chunked SSD's intra-chunk term holds [B C L L H] float32 weights in the reference (one L x L
tile per head and chunk in a kernel), and its inter-chunk recurrence takes S / L sequential steps:
a longer chunk trades quadratic work for fewer sequential steps. Mamba2's published default is 256.
Pallas tiles follow the hardware: Triton blocks are powers of two of at least 16 (its `tl.dot`
minimum); Mosaic TPU blocks are multiples of the 8-row sublane tile (128 preferred, the lane width,
since the L x L tile's columns lie on lanes).
"""

from __future__ import annotations

from jaxllama.kernels._common import round_up

REFERENCE_SSD_CHUNK = 64  # [B C 64 64 H] float32 weights: small beside the [B S H P] activations
REFERENCE_SELECTIVE_CHUNK = 128  # Mamba1: [B 128 Dm N] float32 held per associative-scan chunk
GPU_SSD_CHUNK = 64
TPU_SSD_CHUNK = 128


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
