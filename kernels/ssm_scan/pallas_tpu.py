"""The chunked SSD (Mamba2) for TPUs in Pallas (Mosaic TPU), forward and backward.

The same four kernels as pallas_gpu.py (`jaxllama_ssd_{state,output}_{fwd,bwd}_tpu`), built from the
same backend-generic wrappers and the per-chunk block math of reference.py, compiled by Mosaic: grid
(batch, head, chunk), every axis independent ("parallel", so the chunks of a head may be split over
the TensorCores of a chip), each program's tiles double-buffered by the pipeline emitter from the
index maps. Tested on CPU under `pltpu.InterpretParams()` (`_dispatch.emulate_tpu`); not run on a
TPU yet (none in the writing session); `test_ssm_scan` lowers it for TPU with `jax.export`.

Tiling: P and N are whole blocks (a block dim may equal the array dim), so neither is padded; the
chunk L lies on sublanes in the [L, P] tiles and on lanes in the [1, L] rows of cum and run, so on a
TPU it must be a multiple of 128 whenever the sequence has more than one chunk (the rows' lane
tile; the default chunk is 128), and a multiple of 8 in any case.

Mamba1 (`selective_scan`): `selective_fn` runs pallas_selective.py's kernels with this backend
(`jaxllama_selective_{fwd,bwd}_tpu`, grid (batch, group, channel block, chunk), the chunk axis
sequential with the state in VMEM scratch); any chunk size (time is a leading axis of its tiles).
"""

from __future__ import annotations

from jax.experimental.pallas import tpu as pltpu
from jaxllama.kernels.ssm_scan import heuristics, pallas_selective, reference
from jaxllama.kernels.ssm_scan.pallas_gpu import Backend, chunk_ops

SUBLANES, LANES = 8, 128


def _check_chunk(L: int, s: int, interpret):
    if L % SUBLANES:
        raise ValueError(f"ssd_scan: the TPU kernels need chunk_size a multiple of {SUBLANES}, "
                         f"got {L}")
    if interpret is None and s > L and L % LANES:
        raise ValueError(f"ssd_scan: on a TPU, chunk_size must be a multiple of {LANES} when the "
                         f"sequence ({s}) spans several chunks, got {L}")


def ssd_fn(interpret):
    """ssd(x, dt, A, B, C, D, initial_state, segment_ids, chunk) through the Mosaic kernels;
    `interpret`: `pltpu.InterpretParams()` to run them in the TPU interpreter, None on a TPU."""
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    ops = chunk_ops(Backend("tpu", params, interpret, False))

    def ssd(x, dt, A, B, C, D, initial_state, segment_ids, chunk):
        _check_chunk(chunk, x.shape[1], interpret)
        return reference.ssd_chunked(x, dt, A, B, C, D, initial_state, segment_ids, chunk, ops)
    return ssd


def selective_fn(interpret):
    """selective(u, delta, A, B, C, D, initial_state, segment_ids, chunk) through the Mosaic
    Mamba1 kernels; `interpret` as for `ssd_fn`."""
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
    return pallas_selective.selective_fn(pallas_selective.Backend(
        "tpu", params, interpret, heuristics.tpu_selective_block, False))
