"""The only entry point for attention: `attend(q, k, v, mask, implementation=...)`."""

from __future__ import annotations

from jaxllama.kernels.flash_attention import reference
from jaxllama.kernels.flash_attention.mask import Mask, SinkInputs

IMPLEMENTATIONS = ("auto", "xla")


def attend(q, k, v, mask: Mask, *, sink: SinkInputs | None = None, scale: float | None = None,
           implementation: str = "auto", return_lse: bool = False):
    """Attention of q [B T N H] over k, v [B S K H] under `mask` (see mask.py).

    Returns out [B T N H] in q.dtype, and lse [B N T] float32 when `return_lse`.
    A named implementation never falls back: an unavailable one raises.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    out, lse = reference.attend_reference(q, k, v, mask, sink=sink, scale=scale)
    return (out, lse) if return_lse else out


__all__ = ["attend", "Mask", "SinkInputs", "IMPLEMENTATIONS"]
