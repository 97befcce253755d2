"""Transformer: embed -> runs of blocks -> norm -> logits; `init_cache` builds the matching cache.

Consecutive layers of one kind form a *run*, compiled as one `nn.scan` over stacked weights, so
compile time does not grow with depth. Parameters live at `run_{r}/block/...` with a leading layer
axis; the model cache is a tuple with one entry per run, each the kind's cache class with a leading
layer axis (`ModelConfig.runs` says which layers each run holds).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.block import Block
from jaxllama.config import ModelConfig
from jaxllama.layers.basic import Embed, Linear, RMSNorm, dtype_of
from jaxllama.mixers import spec_of

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _layer_body(block, carry, _):
    x, cache, i, positions, segment_ids = carry
    if cache is None:
        x, _ = block(x, positions, None, segment_ids)
    else:
        layer_cache = jax.tree.map(lambda c: c[i], cache)
        x, layer_cache = block(x, positions, layer_cache, segment_ids)
        cache = jax.tree.map(lambda c, u: jax.lax.dynamic_update_index_in_dim(c, u, i, 0),
                             cache, layer_cache)
    return (x, cache, i + 1, positions, segment_ids), None


class LayerRun(nn.Module):
    """`length` identical blocks of `kind`, scanned (or unrolled) over stacked weights."""

    cfg: ModelConfig
    kind: str
    length: int

    @nn.compact
    def __call__(self, x, positions, cache=None, segment_ids=None):
        block_cls = Block
        if self.cfg.kernels.remat != "none":
            block_cls = nn.remat(Block, prevent_cse=False,
                                 policy=_REMAT_POLICIES[self.cfg.kernels.remat])
        scan = nn.scan(
            _layer_body,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.length,
            unroll=1 if self.cfg.kernels.scan_layers else self.length,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        carry = (x, cache, jnp.zeros((), jnp.int32), positions, segment_ids)
        (x, cache, _, _, _), _ = scan(block_cls(self.cfg, self.kind, name="block"), carry, None)
        return x, cache


class Transformer(nn.Module):
    """tokens [B T] (and positions [B T], default arange) -> (logits [B T V] float32, cache)."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        kw = dict(dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))
        self.embed = Embed(c.vocab_size, c.hidden_size, name="embed", **kw)
        self.runs = [LayerRun(c, kind, n, name=f"run_{r}") for r, (kind, n) in enumerate(c.runs)]
        self.norm = RMSNorm(c.rms_norm_eps, name="norm", **kw)
        if not c.tie_word_embeddings:
            self.lm_head = Linear((c.hidden_size,), (c.vocab_size,), ("embed", "vocab"),
                                  name="lm_head", **kw)

    def hidden(self, tokens, positions=None, cache=None, segment_ids=None):
        """Final-normed hidden states [B T D] and the updated cache (for chunked losses)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = self.embed(tokens)
        new_cache = []
        for r, run in enumerate(self.runs):
            x, c = run(x, positions, None if cache is None else cache[r], segment_ids)
            new_cache.append(c)
        return self.norm(x), (None if cache is None else tuple(new_cache))

    def logits(self, h):
        """LM head on hidden states [.. D] -> float32 logits [.. V]."""
        if self.cfg.tie_word_embeddings:
            out = self.embed.attend(h)
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    def __call__(self, tokens, positions=None, cache=None, segment_ids=None):
        h, cache = self.hidden(tokens, positions, cache, segment_ids)
        return self.logits(h), cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> tuple:
    """The model cache: one stacked cache per run of `cfg.runs` (leading axis = layer in run)."""
    dtype = dtype_of(cfg.dtype) if dtype is None else dtype
    out = []
    for kind, n in cfg.runs:
        spec = spec_of(kind)
        one = spec.cache.init(spec.config(cfg), batch, max_len, dtype)
        out.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape).copy(), one))
    return tuple(out)


def cache_logical_axes(cfg: ModelConfig) -> tuple:
    """Logical axis names of every cache leaf (a leading "layers" axis per run)."""
    out = []
    for kind, _ in cfg.runs:
        spec = spec_of(kind)
        axes = spec.cache.logical_axes(spec.config(cfg))
        out.append(jax.tree.map(lambda a: ("layers",) + tuple(a), axes,
                                is_leaf=lambda a: isinstance(a, tuple)))
    return tuple(out)


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """Random parameters (unboxed) for `cfg`."""
    model = Transformer(cfg)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = model.init(rng, tokens)
    return nn.meta.unbox(variables["params"])


# ----------------------------------------------------------------------------- per-layer view


def layer_locations(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(run r, index j in the run) of every layer l: the one place that knows the run layout."""
    return [(r, j) for r, (_, n) in enumerate(cfg.runs) for j in range(n)]


def _runs_of(cfg: ModelConfig, tree) -> list:
    if isinstance(tree, dict):  # params: run r lives at run_{r}/block
        return [tree[f"run_{r}"]["block"] for r in range(len(cfg.runs))]
    return list(tree)  # the model cache: one stacked cache per run


def unstack(cfg: ModelConfig, tree) -> list:
    """Per-layer trees (leading run axis removed), one per layer of `cfg.layer_pattern`, of the
    params tree (its layer part: each item is that layer's block tree) or of the model cache."""
    runs = _runs_of(cfg, tree)
    return [jax.tree.map(lambda a, j=j: a[j], runs[r]) for r, j in layer_locations(cfg)]


def _stack_leaves(*leaves):
    if all(isinstance(a, np.ndarray) for a in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def stack(cfg: ModelConfig, layers, rest: dict | None = None):
    """Inverse of `unstack`. Without `rest`: the model cache (a tuple, one stacked tree per run).
    With `rest` (the params entries outside the layers: embed, norm, lm_head): the params tree."""
    layers = list(layers)
    if len(layers) != cfg.num_layers:
        raise ValueError(f"stack: {len(layers)} layers for a {cfg.num_layers}-layer config")
    runs, at = [], 0
    for _, n in cfg.runs:
        runs.append(jax.tree.map(_stack_leaves, *layers[at:at + n]))
        at += n
    if rest is None:
        return tuple(runs)
    return {**rest, **{f"run_{r}": {"block": run} for r, run in enumerate(runs)}}
