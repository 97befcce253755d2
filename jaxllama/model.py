"""Transformer: embed -> runs of blocks -> norm -> logits; `init_cache` builds the matching cache.

Consecutive layers of one kind form a *run*, compiled as one `nn.scan` over stacked weights, so
compile time does not grow with depth. Parameters live at `run_{r}/block/...` with a leading layer
axis; the model cache is a tuple with one entry per run, each the kind's cache class with a leading
layer axis (`ModelConfig.runs` says which layers each run holds).

The same module has an *unstacked* layout (`Transformer(cfg, unstacked=True)`): one block per layer
at `layer_{l}/...`, no layer axis, and a model cache with one entry per layer. It exists for
platforms where per-layer weights are faster to read: inside a scanned loop XLA:CPU reads layer l's
weights with a dynamic slice that is a copy, so a one-token decode step, bound by reading every
weight once, would read and write each weight two more times. `unstack_params` / `stack_params`
convert a params tree between the layouts (`unstack` / `stack` below are the per-layer view they
share). `separate_head=True` reads the LM head from its own [D V] kernel at `lm_head/kernel` even
when the embedding is tied (`unstack_params(..., separate_head=True)` writes the transposed table
there): XLA:CPU's matrix-vector product reads a [D V] operand faster than it contracts the last axis
of [V D] (figures in BENCHMARKS.md).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.block import Block
from jaxllama.config import ModelConfig
from jaxllama.layers.basic import Embed, Linear, RMSNorm, default_init, dtype_of
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


def _block_cls(cfg: ModelConfig):
    if cfg.kernels.remat == "none":
        return Block
    return nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.kernels.remat])


class LayerRun(nn.Module):
    """`length` identical blocks of `kind`, scanned (or unrolled) over stacked weights."""

    cfg: ModelConfig
    kind: str
    length: int

    @nn.compact
    def __call__(self, x, positions, cache=None, segment_ids=None):
        block_cls = _block_cls(self.cfg)
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


class SeparateHead(nn.Module):
    """The LM head as its own kernel [D V]: h [.. D] -> float32 logits [.. V], accumulated in
    float32 and not rounded to `dtype` (what the tied `Embed.attend` returns)."""

    vocab_size: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        w = self.param("kernel", nn.with_logical_partitioning(default_init, ("embed", "vocab")),
                       (self.features, self.vocab_size), self.param_dtype)
        # [.. D] x [D V] -> [.. V]
        return jnp.einsum("...d,dv->...v", h.astype(self.dtype), w.astype(self.dtype),
                          preferred_element_type=jnp.float32)


class Transformer(nn.Module):
    """tokens [B T] (and positions [B T], default arange) -> (logits [B T V] float32, cache).

    `unstacked`: one block per layer (`layer_{l}`) and one cache per layer instead of scanned runs
    (see the module docstring). `separate_head`: the LM head is `lm_head/kernel` [D V] whatever
    `cfg.tie_word_embeddings` says (a tied model re-laid by `unstack_params(separate_head=True)`).
    """

    cfg: ModelConfig
    unstacked: bool = False
    separate_head: bool = False

    def setup(self):
        c = self.cfg
        kw = {"dtype": dtype_of(c.dtype), "param_dtype": dtype_of(c.param_dtype)}
        self.embed = Embed(c.vocab_size, c.hidden_size, name="embed", **kw)
        if self.unstacked:
            block_cls = _block_cls(c)
            self.blocks = [block_cls(c, kind, name=f"layer_{i}")
                           for i, kind in enumerate(c.layer_pattern)]
        else:
            self.blocks = [LayerRun(c, kind, n, name=f"run_{r}")
                           for r, (kind, n) in enumerate(c.runs)]
        self.norm = RMSNorm(c.rms_norm_eps, name="norm", **kw)
        if self.separate_head:
            self.lm_head = SeparateHead(c.vocab_size, c.hidden_size, name="lm_head", **kw)
        elif not c.tie_word_embeddings:
            self.lm_head = Linear((c.hidden_size,), (c.vocab_size,), ("embed", "vocab"),
                                  name="lm_head", **kw)

    def hidden(self, tokens, positions=None, cache=None, segment_ids=None):
        """Final-normed hidden states [B T D] and the updated cache (for chunked losses)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = self.embed(tokens)
        new_cache = []
        for i, block in enumerate(self.blocks):  # a run of layers, or one layer when unstacked
            x, c = block(x, positions, None if cache is None else cache[i], segment_ids)
            new_cache.append(c)
        return self.norm(x), (None if cache is None else tuple(new_cache))

    def logits(self, h):
        """LM head on hidden states [.. D] -> float32 logits [.. V]."""
        if self.cfg.tie_word_embeddings and not self.separate_head:
            out = self.embed.attend(h)
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    def __call__(self, tokens, positions=None, cache=None, segment_ids=None):
        h, cache = self.hidden(tokens, positions, cache, segment_ids)
        return self.logits(h), cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None,
               unstacked: bool = False) -> tuple:
    """The model cache: one stacked cache per run of `cfg.runs` (leading axis = layer in run), or
    with `unstacked` one cache per layer (the `Transformer(unstacked=True)` layout)."""
    dtype = dtype_of(cfg.dtype) if dtype is None else dtype
    groups = [(kind, 1) for kind in cfg.layer_pattern] if unstacked else cfg.runs
    out = []
    for kind, n in groups:
        spec = spec_of(kind)
        one = spec.cache.init(spec.config(cfg), batch, max_len, dtype)
        if not unstacked:
            one = jax.tree.map(lambda a, n=n: jnp.broadcast_to(a, (n,) + a.shape).copy(), one)
        out.append(one)
    return tuple(out)


def cache_logical_axes(cfg: ModelConfig, unstacked: bool = False) -> tuple:
    """Logical axis names of every cache leaf (a leading "layers" axis per run; none per layer
    with `unstacked`)."""
    out = []
    for kind in (cfg.layer_pattern if unstacked else [kind for kind, _ in cfg.runs]):
        spec = spec_of(kind)
        axes = spec.cache.logical_axes(spec.config(cfg))
        if not unstacked:
            axes = jax.tree.map(lambda a: ("layers",) + tuple(a), axes,
                                is_leaf=lambda a: isinstance(a, tuple))
        out.append(axes)
    return tuple(out)


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8, **layout):
    """Random parameters (unboxed) for `cfg`; `layout`: `Transformer`'s `unstacked`,
    `separate_head`."""
    model = Transformer(cfg, **layout)
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


def _is_layer_key(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and key[len(prefix):].isdigit()


def unstack(cfg: ModelConfig, tree) -> list:
    """Per-layer trees (leading run axis removed), one per layer of `cfg.layer_pattern`, of the
    params tree (its layer part: each item is that layer's block tree) or of the model cache.
    A params tree already in the unstacked layout (`layer_{l}`) gives its layers as they are."""
    if isinstance(tree, dict) and any(_is_layer_key(k, "layer_") for k in tree):
        return [tree[f"layer_{i}"] for i in range(cfg.num_layers)]
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


def _rest(params: dict) -> dict:
    """The params entries outside the layers (embed, norm, lm_head)."""
    return {k: v for k, v in params.items()
            if not (_is_layer_key(k, "run_") or _is_layer_key(k, "layer_"))}


def unstack_params(cfg: ModelConfig, params: dict, separate_head: bool = False) -> dict:
    """The params tree of `Transformer(cfg, unstacked=True, separate_head=...)`: `layer_{l}` per
    layer (views or slices of the stacked weights; copies where a slice must be materialized).
    `separate_head` on a tied model adds `lm_head/kernel` = the embedding table transposed [D V]."""
    out = {**_rest(params), **{f"layer_{i}": t for i, t in enumerate(unstack(cfg, params))}}
    if separate_head and "lm_head" not in out:
        out["lm_head"] = {"kernel": jnp.asarray(params["embed"]["embedding"]).T}
    return out


def stack_params(cfg: ModelConfig, params: dict) -> dict:
    """Inverse of `unstack_params`: the stacked (`run_{r}/block`) tree of `Transformer(cfg)`. A
    separate head that a tied config does not hold (the transposed table) is dropped."""
    rest = _rest(params)
    if cfg.tie_word_embeddings:
        rest.pop("lm_head", None)
    return stack(cfg, unstack(cfg, params), rest)


def _paths(tree, prefix=()) -> dict[tuple, tuple]:
    """{path: shape} of every leaf of a nested dict of arrays (or ShapeDtypeStructs)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_paths(v, prefix + (k,)))
        return out
    return {prefix: tuple(tree.shape)}


def first_mismatch(got, want) -> tuple[str, tuple | None, tuple | None] | None:
    """The first path whose presence or shape differs between two params trees (nested dicts of
    arrays, ShapeDtypeStructs or anything with `.shape`): (path "a/b/c", shape in `got` or None
    when absent, shape in `want` or None when absent); None when the trees agree."""
    a, b = _paths(got), _paths(want)
    for path in list(b) + [p for p in a if p not in b]:
        if a.get(path) != b.get(path):
            return "/".join(map(str, path)), a.get(path), b.get(path)
    return None


def relayout_params(params: dict, old: ModelConfig, new: ModelConfig) -> dict:
    """A params tree of `old` for the config `new` (overrides may regroup the runs, e.g.
    dense*2,lambda*28, through the per-layer view). Every leaf must keep its path and its
    per-layer shape; ValueError naming the first that does not."""
    key = jax.random.key(0)
    if old.runs == new.runs:
        got, want = params, jax.eval_shape(lambda: init_params(new, key))
    elif old.num_layers != new.num_layers:
        raise ValueError(f"{old.num_layers} layers cannot become {new.num_layers}")
    else:
        layers = unstack(old, params)
        got = {"rest": _rest(params), **{f"layer_{i}": t for i, t in enumerate(layers)}}
        want = jax.eval_shape(lambda: unstack_params(new, init_params(new, key)))
        want = {"rest": _rest(want), **{k: v for k, v in want.items() if k not in _rest(want)}}
    bad = first_mismatch(got, want)
    if bad is not None:
        path, a, b = bad
        path = path.removeprefix("rest/")
        if a is None or b is None:
            what = "not in the params" if a is None else "not in the new config"
            raise ValueError(f"{path}: {what} (only the layer pattern and shape-preserving "
                             "fields may change)")
        raise ValueError(f"{path} would change shape {list(a)} -> {list(b)}")
    return params if old.runs == new.runs else stack(new, layers, _rest(params))
