"""The only entry point for attention: `attend(q, k, v, mask, implementation=...)`."""

from __future__ import annotations

import jax.numpy as jnp
from jaxllama.kernels import _dispatch
from jaxllama.kernels._dispatch import IMPLEMENTATIONS, UnavailableImplementation
from jaxllama.kernels.flash_attention import reference
from jaxllama.kernels.flash_attention.mask import (
    Columns,
    Mask,
    SinkInputs,
    ordinary_columns,
    sink_columns,
)
from jaxllama.kernels.flash_attention.reference import Aux, Static, merge_partials


def _implementation(name: str):
    """`fn(static, q, k, v, aux) -> (out, lse)` of a concrete implementation, and its options."""
    if name == "xla":
        return reference.attend_blockwise, ()
    if name == "pallas_interpret":
        from jaxllama.kernels.flash_attention import pallas_gpu

        return pallas_gpu.attend_gpu, (("interpret", True),)
    if name == "pallas_gpu":
        from jaxllama.kernels.flash_attention import pallas_gpu

        return pallas_gpu.attend_gpu, (("interpret", False),)
    if name == "pallas_tpu":
        from jaxllama.kernels.flash_attention import pallas_tpu

        return pallas_tpu.attend_tpu, (("interpret", _dispatch.tpu_interpret_params()),)
    raise AssertionError(name)


def _check(q, k, v, mask: Mask, sink: SinkInputs | None):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attend: q, k, v must be [B T N H], [B S K H], [B S K H]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attend: k {k.shape} and v {v.shape} do not match q {q.shape}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"attend: needs at least one query and one key, got q {q.shape}, "
                         f"k {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attend: {q.shape[2]} query heads are not a multiple of {k.shape[2]} "
                         "key/value heads")
    if mask.window is not None and mask.window < 1:
        raise ValueError(f"attend: mask.window must be >= 1, got {mask.window}")
    if sink is not None and (sink.q.shape != q.shape or sink.k.shape != sink.v.shape
                             or sink.k.shape[2:] != k.shape[2:]):
        raise ValueError(f"attend: sink shapes q {sink.q.shape}, k {sink.k.shape}, v "
                         f"{sink.v.shape} do not match q {q.shape}, k {k.shape}")


def _one_set(fn, options, cols: Columns, scale, out_dtype, q, k, v, q_offset, k_offset, qseg, kseg):
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    aux = Aux(i32(q_offset), i32(k_offset), i32(qseg) if cols.segments else None,
              i32(kseg) if cols.segments else None)
    return fn(Static(cols, float(scale), jnp.dtype(out_dtype).name, options), q, k, v, aux)


def attend(q, k, v, mask: Mask, *, sink: SinkInputs | None = None, scale: float | None = None,
           implementation: str = "auto", return_lse: bool = False,
           block_sizes: tuple[int, int] | None = None):
    """Attention of q [B T N H] over k, v [B S K H] (N a multiple of K) under `mask` (mask.py).

    Returns out [B T N H] in q.dtype, and lse [B N T] float32 when `return_lse` (-inf, with output
    0, for rows that see nothing). Differentiable in q, k, v, the sink inputs and the lse.
    A named implementation never falls back: an unavailable one raises. `block_sizes`
    (block_q, block_k) overrides the implementation's heuristics (tuning and tests).
    """
    _check(q, k, v, mask, sink)
    name = _dispatch.resolve(implementation)
    fn, options = _implementation(name)
    if block_sizes is not None:
        bq, bk = (int(x) for x in block_sizes)
        if bq < 1 or bk < 1:
            raise ValueError(f"attend: block_sizes must be positive, got {block_sizes}")
        options = (*options, ("blocks", (bq, bk)))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if sink is not None and sink.k.shape[1] == 0:
        sink = None
    qseg = mask.q_segment_ids
    out_dtype = q.dtype if sink is None else jnp.float32
    out, lse = _one_set(fn, options, ordinary_columns(mask), scale, out_dtype, q, k, v,
                        mask.q_offset, mask.k_offset, qseg, mask.kv_segment_ids)
    if sink is not None:
        s_out, s_lse = _one_set(fn, options, sink_columns(mask, sink), scale, jnp.float32,
                                sink.q, sink.k, sink.v, mask.q_offset, 0, qseg, sink.segment_ids)
        out, lse = merge_partials(out, lse, s_out, s_lse)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


__all__ = ["IMPLEMENTATIONS", "Mask", "SinkInputs", "UnavailableImplementation", "attend"]
