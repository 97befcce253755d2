"""The only entry points for selective scans: `ssd_scan` (Mamba2) and `selective_scan` (Mamba1).

Registers the op `ssm_scan` with `_dispatch` (`KernelConfig.ssm_scan` names its implementation):
`xla` is the jnp reference (the chunked SSD for Mamba2; for Mamba1 the chunked associative scan, or
on CPU the sequential recurrence, which is faster there: heuristics.py);
`pallas_interpret` runs the GPU kernel bodies in the Pallas interpreter (CPU tests); `pallas_gpu`
and `pallas_tpu` are the Triton and Mosaic TPU kernels; `auto` picks `pallas_gpu` on GPUs,
`pallas_tpu` on TPUs and `xla` elsewhere, logged once. A named implementation never falls back: it
raises `UnavailableImplementation` when it cannot run here. Every implementation has both forms
(the Mamba1 kernels: pallas_selective.py).

Both return (y, final_state): the final state float32, for chunked prefill, the prefill-to-decode
handoff and sequence parallelism (jaxllama/parallel/ssm_sequence.py); `initial_state` continues a
scan from a previous piece. Semantics, segments included: reference.py's module docstring.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxllama.kernels import _dispatch
from jaxllama.kernels._dispatch import IMPLEMENTATIONS, UnavailableImplementation


class Kernels(NamedTuple):
    """One implementation's two forms: ssd(x, dt, A, B, C, D, initial_state, segment_ids,
    chunk_size) and selective(u, delta, A, B, C, D, initial_state, segment_ids, chunk_size), plus
    each one's default chunk for a length (`xla`'s Mamba1 on CPU runs the recurrence and ignores
    its chunk)."""

    ssd: object
    selective: object
    ssd_chunk: object
    selective_chunk: object


def _load_xla():
    from jaxllama.kernels.ssm_scan import heuristics, reference

    # one step (decode) is the recurrence itself: no chunk padding, no associative scan
    def ssd(x, dt, A, B, C, D, h0, seg, chunk):
        if x.shape[1] == 1:
            return reference.ssd_sequential(x, dt, A, B, C, D, h0, seg)
        return reference.ssd_chunked(x, dt, A, B, C, D, h0, seg, chunk)

    def selective(u, delta, A, B, C, D, h0, seg, chunk):
        if u.shape[1] == 1 or heuristics.reference_selective_sequential(_dispatch.platform()):
            return reference.selective_sequential(u, delta, A, B, C, D, h0, seg)
        return reference.selective_chunked(u, delta, A, B, C, D, h0, seg, chunk)

    return Kernels(ssd, selective, heuristics.reference_ssd_chunk,
                   heuristics.reference_selective_chunk)


def _load_gpu(interpret: bool):
    def load():
        from jaxllama.kernels.ssm_scan import heuristics, pallas_gpu

        return Kernels(pallas_gpu.ssd_fn(interpret), pallas_gpu.selective_fn(interpret),
                       heuristics.gpu_ssd_chunk, heuristics.selective_chunk)
    return load


def _load_tpu():
    from jaxllama.kernels.ssm_scan import heuristics, pallas_tpu

    interpret = _dispatch.tpu_interpret_params()
    return Kernels(pallas_tpu.ssd_fn(interpret), pallas_tpu.selective_fn(interpret),
                   heuristics.tpu_ssd_chunk, heuristics.selective_chunk)


_dispatch.register(
    "ssm_scan", auto={"gpu": "pallas_gpu", "tpu": "pallas_tpu"},
    implementations={"xla": _load_xla, "pallas_interpret": _load_gpu(True),
                     "pallas_gpu": _load_gpu(False), "pallas_tpu": _load_tpu})


def _shape_error(fn: str, what: str, got, want: str):
    raise ValueError(f"{fn}: {what} has shape {tuple(got)}, expected {want}")


def _check_common(fn, b, s, B, C, segment_ids, heads, name):
    if B.ndim != 4 or B.shape[:2] != (b, s):
        _shape_error(fn, "B", B.shape, f"[{b} {s} G N]")
    if C.shape != B.shape:
        _shape_error(fn, "C", C.shape, f"B's {tuple(B.shape)}")
    if heads % B.shape[2]:
        raise ValueError(f"{fn}: {heads} {name} are not a multiple of {B.shape[2]} B/C groups")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, s):
        _shape_error(fn, "segment_ids", segment_ids.shape, f"[{b} {s}]")
    if s == 0:
        raise ValueError(f"{fn}: needs at least one step, got sequence length 0")


def _check_ssd(x, dt, A, B, C, D, initial_state, segment_ids):
    if x.ndim != 4:
        _shape_error("ssd_scan", "x", x.shape, "[B S H P]")
    b, s, h, p = x.shape
    if tuple(dt.shape) != (b, s, h):
        _shape_error("ssd_scan", "dt", dt.shape, f"[{b} {s} {h}]")
    if tuple(A.shape) != (h,):
        _shape_error("ssd_scan", "A", A.shape, f"[{h}] (one scalar decay per head)")
    _check_common("ssd_scan", b, s, B, C, segment_ids, h, "heads")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        _shape_error("ssd_scan", "D", D.shape, f"[{h}] or [{h} {p}]")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, p, B.shape[3]):
        _shape_error("ssd_scan", "initial_state", initial_state.shape,
                     f"[{b} {h} {p} {B.shape[3]}]")


def ssd_scan(x, dt, A, B, C, *, D=None, initial_state=None, segment_ids=None,
             chunk_size: int | None = None, implementation: str = "auto"):
    """Mamba2's scan: x [B S H P], dt [B S H] (the caller's softplus(dt + bias), clamped),
    A [H] (negative), B, C [B S G N] (H a multiple of G), D None | [H] | [H P], initial_state
    None | [B H P N] float32, segment_ids None | [B S] int (0: padding).

    Returns (y [B S H P] in x.dtype, final_state [B H P N] float32); differentiable in every
    float input. `chunk_size` overrides the implementation's heuristic (tuning and tests)."""
    _check_ssd(x, dt, A, B, C, D, initial_state, segment_ids)
    _, kernels = _dispatch.implementation("ssm_scan", implementation)
    chunk = kernels.ssd_chunk(x.shape[1]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"ssd_scan: chunk_size must be positive, got {chunk_size}")
    return kernels.ssd(x, dt, A, B, C, D, initial_state, segment_ids, chunk)


def _check_selective(u, delta, A, B, C, D, initial_state, segment_ids):
    if u.ndim != 3:
        _shape_error("selective_scan", "u", u.shape, "[B S D]")
    b, s, dm = u.shape
    if tuple(delta.shape) != (b, s, dm):
        _shape_error("selective_scan", "delta", delta.shape, f"u's {tuple(u.shape)}")
    _check_common("selective_scan", b, s, B, C, segment_ids, dm, "channels")
    n = B.shape[3]
    if tuple(A.shape) != (dm, n):
        _shape_error("selective_scan", "A", A.shape, f"[{dm} {n}]")
    if D is not None and tuple(D.shape) != (dm,):
        _shape_error("selective_scan", "D", D.shape, f"[{dm}]")
    if initial_state is not None and tuple(initial_state.shape) != (b, dm, n):
        _shape_error("selective_scan", "initial_state", initial_state.shape, f"[{b} {dm} {n}]")


def selective_scan(u, delta, A, B, C, *, D=None, initial_state=None, segment_ids=None,
                   chunk_size: int | None = None, implementation: str = "auto"):
    """Mamba1's scan: u, delta [B S D] (delta already softplus(dt + bias)), A [D N] (negative),
    B, C [B S G N] (D a multiple of G; G = 1 is plain Mamba1), D None | [D], initial_state
    None | [B D N] float32, segment_ids None | [B S] int (0: padding).

    Returns (y [B S D] in u.dtype, final_state [B D N] float32); differentiable in every float
    input. `chunk_size` overrides the implementation's heuristic: the associative scan's chunk
    (`xla` off CPU; on CPU `xla` runs the sequential recurrence and ignores it) or the Pallas
    kernels' checkpoint spacing (tuning and tests)."""
    _check_selective(u, delta, A, B, C, D, initial_state, segment_ids)
    _, kernels = _dispatch.implementation("ssm_scan", implementation)
    chunk = kernels.selective_chunk(u.shape[1]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"selective_scan: chunk_size must be positive, got {chunk_size}")
    return kernels.selective(u, delta, A, B, C, D, initial_state, segment_ids, chunk)


__all__ = ["IMPLEMENTATIONS", "UnavailableImplementation", "selective_scan", "ssd_scan"]
