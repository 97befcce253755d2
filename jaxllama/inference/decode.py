"""The decode layout of the weights: a re-layout and cast of the model's params, not another model.

Decoding runs the same `Transformer` as prefill and training; only the layout of its params may
differ (`DecodeLayout`, chosen per platform by `engine_defaults`):

- stacked (`unstacked=False`): the params as they are, scanned runs, the model cache as prefill
  writes it. Nothing is copied when the decode dtype is the param dtype.
- unstacked (`unstacked=True`): one block per layer (`Transformer(unstacked=True)`), with one cache
  per layer. On CPU a scanned loop reads each layer's weights through a dynamic slice that XLA:CPU
  materializes as a copy, and a one-token step is bound by reading the weights once, so separate
  per-layer buffers are faster there; the unrolled layer loop's compile time grows with depth.
- `separate_head=True` (tied embeddings): the LM head reads a transposed [D V] copy of the table,
  which XLA:CPU's matrix-vector product reads faster than the [V D] table.

Fused kernels (`decode_weights(..., fused=True)`, independent of the layout: the modules find
them by name): in each block the MLP's gate and up kernels become one [D 2 F] kernel and the
attention projections q, k, v (dense `Attention` and its subclasses: any mixer module with a
`fuse_decode_params` static method) one [D N+2K H] kernel, so a one-token step runs one
matrix-vector product for each instead of two or three. Only the decode copy has them: the stored
params and checkpoints keep the separate kernels, and with `fused` the tree is always a copy (so
the engine fuses only where decode copies the weights anyway, the CPU layout).

Measured figures are in BENCHMARKS.md (decode layout and generation tables).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxllama.config import ModelConfig
from jaxllama.layers.basic import fuse_mlp_params
from jaxllama.mixers import spec_of
from jaxllama.model import Transformer, unstack, unstack_params


@dataclass(frozen=True)
class DecodeLayout:
    """How decode holds the weights and caches (see the module docstring)."""

    unstacked: bool = False  # per-layer weights `layer_{l}` and per-layer caches
    separate_head: bool = False  # the LM head as its own [D V] kernel (a tied table transposed)

    def model(self, cfg: ModelConfig) -> Transformer:
        """The decode model: `cfg.dtype` is the decode compute dtype."""
        return Transformer(cfg, unstacked=self.unstacked, separate_head=self.separate_head)


def decode_weights(cfg: ModelConfig, params: dict, dtype, layout: DecodeLayout,
                   fused: bool = False) -> dict:
    """`params` (the model's stacked tree) re-laid for `layout` and cast to `dtype`, with the
    fused q/k/v and gate/up kernels when `fused` (module docstring).

    The stacked layout in the params' own dtype returns `params` itself: no second copy of the
    weights. Otherwise one jitted pass writes the new tree (slices and casts fused). Kinds whose
    spec has `decode_params` (MLA's absorbed W_UK / W_UV) get those weights added here, once."""
    dtype = jnp.dtype(dtype)
    extra = any(spec_of(kind).decode_params is not None for kind in set(cfg.layer_pattern))
    relaid = layout.unstacked or layout.separate_head or fused or extra
    if not relaid and all(a.dtype == dtype for a in jax.tree.leaves(params)):
        return params

    def relayout(p):
        p = with_decode_params(cfg, p)
        if fused:
            p = fused_params(cfg, p)
        if layout.unstacked:
            p = unstack_params(cfg, p, separate_head=layout.separate_head)
        elif layout.separate_head and "lm_head" not in p:
            p = {**p, "lm_head": {"kernel": p["embed"]["embedding"].T}}
        return jax.tree.map(lambda a: a.astype(dtype), p)

    return jax.jit(relayout)(params)


def with_decode_params(cfg: ModelConfig, params: dict) -> dict:
    """The stacked params with each run's mixer params passed through its kind's
    `decode_params` (leading layer axis included); kinds without one are left as they are."""
    out = dict(params)
    for r, (kind, _) in enumerate(cfg.runs):
        spec = spec_of(kind)
        key = f"run_{r}"
        if spec.decode_params is None or key not in out:
            continue
        block = dict(out[key]["block"])
        block["mixer"] = spec.decode_params(spec.config(cfg), block["mixer"])
        out[key] = {**out[key], "block": block}
    return out


def fused_params(cfg: ModelConfig, params: dict) -> dict:
    """The stacked params with every block's MLP gate/up and (where the mixer module can,
    `fuse_decode_params`) attention q/k/v kernels fused (`decode_weights(..., fused=True)`)."""
    out = dict(params)
    for r, (kind, _) in enumerate(cfg.runs):
        key = f"run_{r}"
        if key not in out:
            continue
        block = dict(out[key]["block"])
        fuse = getattr(spec_of(kind).module, "fuse_decode_params", None)
        if fuse is not None:
            block["mixer"] = fuse(block["mixer"])
        if "mlp" in block:
            block["mlp"] = fuse_mlp_params(block["mlp"])
        out[key] = {**out[key], "block": block}
    return out


def decode_caches(cfg: ModelConfig, cache: tuple, layout: DecodeLayout) -> tuple:
    """The model cache as prefill writes it (one stacked cache per run) in `layout`'s form: per
    layer when unstacked, unchanged otherwise. Called inside a jit that donates `cache`, so the
    stacked copy is freed once the per-layer one exists."""
    return tuple(unstack(cfg, cache)) if layout.unstacked else cache


__all__ = ["DecodeLayout", "decode_caches", "decode_weights", "fused_params", "with_decode_params"]
