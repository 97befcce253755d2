"""The only entry point for attention: `attend(q, k, v, mask, extra=..., implementation=...)`.

Registers the op `attention` with `_dispatch`: `auto` runs `pallas_gpu` on GPUs, `pallas_tpu` on
TPUs and the blockwise jnp reference (`xla`) elsewhere, except on CPU for the shapes where the
few large masked products (`xla_masked`, masked.py) measured faster
(`heuristics.cpu_masked_attention`); `pallas_interpret` runs the GPU kernel body in the Pallas
interpreter (CPU tests).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxllama.kernels import _dispatch
from jaxllama.kernels._common import merge_partials
from jaxllama.kernels._dispatch import IMPLEMENTATIONS, UnavailableImplementation
from jaxllama.kernels.flash_attention import heuristics
from jaxllama.kernels.flash_attention.mask import (
    ALWAYS,
    BEYOND_WINDOW,
    VISIBILITIES,
    Columns,
    ExtraColumns,
    Mask,
    extra_columns,
    ordinary_columns,
)
from jaxllama.kernels.flash_attention.reference import Aux, Static


def _load_xla():
    from jaxllama.kernels.flash_attention import reference

    return reference.attend_blockwise, ()


def _load_masked():
    from jaxllama.kernels.flash_attention import masked

    return masked.attend_masked, ()


def _load_gpu(interpret: bool):
    def load():
        from jaxllama.kernels.flash_attention import pallas_gpu

        return pallas_gpu.attend_gpu, (("interpret", interpret),)
    return load


def _load_tpu():
    from jaxllama.kernels.flash_attention import pallas_tpu

    return pallas_tpu.attend_tpu, (("interpret", _dispatch.tpu_interpret_params()),)


_dispatch.register(
    "attention", auto={"gpu": "pallas_gpu", "tpu": "pallas_tpu"},
    implementations={"xla": _load_xla, "xla_masked": _load_masked, "pallas_interpret": _load_gpu(True),
                     "pallas_gpu": _load_gpu(False), "pallas_tpu": _load_tpu})


def _check(q, k, v, mask: Mask, extra: ExtraColumns | None):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attend: q, k, v must be [B T N H], [B S K H], [B S K U]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if (k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]):
        raise ValueError(f"attend: k {k.shape} and v {v.shape} do not match q {q.shape} "
                         "(need q [B T N H], k [B S K H], v [B S K U])")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"attend: needs at least one query and one key, got q {q.shape}, "
                         f"k {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attend: {q.shape[2]} query heads are not a multiple of {k.shape[2]} "
                         "key/value heads")
    if mask.window is not None and mask.window < 1:
        raise ValueError(f"attend: mask.window must be >= 1, got {mask.window}")
    if extra is None:
        return
    if extra.visibility not in VISIBILITIES:
        raise ValueError(f"attend: extra.visibility {extra.visibility!r} is not one of "
                         f"{VISIBILITIES}")
    eq = q if extra.q is None else extra.q
    b, m = extra.k.shape[:2] if extra.k.ndim == 4 else (None, None)
    if (eq.shape != q.shape or extra.k.ndim != 4 or extra.v.ndim != 4
            or extra.k.shape[2:] != k.shape[2:] or extra.v.shape[2:] != v.shape[2:]
            or extra.v.shape[:2] != (b, m) or b != q.shape[0]):
        raise ValueError(f"attend: extra columns q {None if extra.q is None else extra.q.shape}, "
                         f"k {extra.k.shape}, v {extra.v.shape} do not match q {q.shape}, "
                         f"k {k.shape}, v {v.shape} (need q [B T N H], k [B M K H], v [B M K U])")
    if extra.segment_ids is not None:
        if mask.q_segment_ids is None:
            raise ValueError("attend: extra.segment_ids need mask.q_segment_ids (a query's "
                             "segment decides which extra columns it sees)")
        if extra.segment_ids.shape != (b, m):
            raise ValueError(f"attend: extra.segment_ids {extra.segment_ids.shape} must be [B M] "
                             f"= {(b, m)}")


def _static_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _static_aux(options, cols: Columns, scale, out_dtype, q_offset, k_offset, qseg, kseg):
    if ("offsets", None) in options:  # xla_masked: Python-int offsets let it slice keys statically
        options = tuple(o for o in options if o != ("offsets", None))
        if _static_int(q_offset) and _static_int(k_offset):
            options = (*options, ("offsets", (int(q_offset), int(k_offset))))
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    aux = Aux(i32(q_offset), i32(k_offset), i32(qseg) if cols.segments else None,
              i32(kseg) if cols.segments else None)
    return Static(cols, float(scale), jnp.dtype(out_dtype).name, options), aux


def _one_set(fn, options, cols: Columns, scale, out_dtype, q, k, v, q_offset, k_offset, qseg, kseg):
    static, aux = _static_aux(options, cols, scale, out_dtype, q_offset, k_offset, qseg, kseg)
    return fn(static, q, k, v, aux)


def _resolve(implementation: str, q, k):
    """(name, (fn, options)) of the implementation `attend` runs for these shapes."""
    chosen, (fn, options) = _dispatch.implementation("attention", implementation)
    if (implementation == "auto" and chosen == "xla" and _dispatch.platform() == "cpu"
            and heuristics.cpu_masked_attention(q.shape[1], k.shape[1])):
        chosen, (fn, options) = _dispatch.implementation("attention", "xla_masked")
    if chosen == "xla_masked":
        options = (*options, ("offsets", None))  # filled per column set by `_static_aux`
    return chosen, (fn, options)


def attend(q, k, v, mask: Mask, *, extra: ExtraColumns | None = None, scale: float | None = None,
           implementation: str = "auto", return_lse: bool = False,
           block_sizes: tuple[int, int] | None = None):
    """Attention of q [B T N H] over k [B S K H], v [B S K U] (N a multiple of K; the value head
    dim U may differ from H) under `mask`, plus the `extra` key columns (mask.py: lambda's sinks,
    FoT's memory), one softmax over the union.

    Returns out [B T N U] in q.dtype, and lse [B N T] float32 when `return_lse` (-inf, with output
    0, for rows that see nothing). Differentiable in q, k, v, the extra q, k, v and the lse.
    The extra set runs as its own kernel call (k_offset 0: column g at position g) and is merged
    by log-sum-exp, so its keys are never concatenated with the ordinary ones. A named
    implementation never falls back: an unavailable one raises. `block_sizes` (block_q, block_k)
    overrides the implementation's heuristics (tuning and tests).
    """
    _check(q, k, v, mask, extra)
    _, (fn, options) = _resolve(implementation, q, k)
    if block_sizes is not None:
        bq, bk = (int(x) for x in block_sizes)
        if bq < 1 or bk < 1:
            raise ValueError(f"attend: block_sizes must be positive, got {block_sizes}")
        options = (*options, ("blocks", (bq, bk)))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if extra is not None and extra.k.shape[1] == 0:
        extra = None
    qseg = mask.q_segment_ids
    out_dtype = q.dtype if extra is None else jnp.float32
    out, lse = _one_set(fn, options, ordinary_columns(mask), scale, out_dtype, q, k, v,
                        mask.q_offset, mask.k_offset, qseg, mask.kv_segment_ids)
    if extra is not None:
        eq = q if extra.q is None else extra.q
        e_out, e_lse = _one_set(fn, options, extra_columns(mask, extra), scale, jnp.float32,
                                eq, extra.k, extra.v, mask.q_offset, 0, qseg, extra.segment_ids)
        out, lse = merge_partials(out, lse, e_out, e_lse)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def attend_backward(q, k, v, mask: Mask, out, lse, dout, *, scale: float | None = None,
                    implementation: str = "auto"):
    """(dq, dk, dv) float32 that q [B T N H], k [B S K H], v [B S K U] under `mask` (its ordinary
    columns) receive from a softmax whose *final* output and log-sum-exp are `out` [B T N U] and
    `lse` [B N T], taken over these columns and maybe others, given the output cotangent `dout`.

    Per visible score s: p = exp(s - lse), ds = p (dout . v - rowsum(dout * out)); no forward
    runs. Summed over disjoint column sets that together are the whole softmax, the results are
    that softmax's gradients: ring attention's per-step blocks, without recomputing each block's
    own output and lse. Rows that see none of these columns get zero."""
    _check(q, k, v, mask, None)
    _, (fn, options) = _resolve(implementation, q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    static, aux = _static_aux(options, ordinary_columns(mask), scale, q.dtype, mask.q_offset,
                              mask.k_offset, mask.q_segment_ids, mask.kv_segment_ids)
    grads = fn.backward(static, q, k, v, aux, out, lse, dout, jnp.zeros_like(lse))
    return tuple(g.astype(jnp.float32) for g in grads)


__all__ = ["ALWAYS", "BEYOND_WINDOW", "IMPLEMENTATIONS", "ExtraColumns", "Mask",
           "UnavailableImplementation", "attend", "attend_backward"]
