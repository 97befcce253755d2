"""Cache planner: bytes the decode cache of a model takes at a given context length.

    python -m jaxllama.kvcache --config configs/models/cbhybrid-m-8b.yaml --seq-len 16384 \\
        --memory-tokens 256:8 --baseline configs/models/llama3.1-8b.yaml

The plan is `jax.eval_shape` of the model's own `init_cache`: nothing is allocated and no layer
kind is described here, so a new kind's cache class is planned as soon as it exists. Each run's
stacked cache is summed into its kind's row. Two splits of the same bytes are reported:

- keys/values against bookkeeping: floating leaves (keys, values, or a recurrent kind's state)
  against integer leaves (segment ids, lengths, slot counters). The key/value bytes are what the
  published figures count (METHODS section 6 reproduces exactly: Llama-3.1-8B 2.147 GB at 16K,
  CBHybrid-M 1.275 GB and CBHybrid-L 1.376 GB with memory tokens 256:8).
- sequence-growing against constant: a leaf grows when its shape at a longer `max_len` differs
  (the shapes are evaluated at two lengths), e.g. a dense layer's [B S K H] keys; a sliding-window
  ring buffer or a recurrent state does not.

A recurrent kind's floating leaves (its spec's padding is `state_reset`: the SSM state, float32
whatever the cache dtype, and the conv window) are printed as "recurrent state", apart from the
keys/values total, beside the sequence-growing bytes.

With memory tokens E:M a context of N ordinary tokens is planned with floor(N / E) * M memory
positions: the steady state of a conversation that keeps growing, where the M tokens follow each
completed episode (`insert_memory_tokens` on a finished text omits the block after its last
episode).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxllama.config import DTYPES, ConfigError, ModelConfig, load_model_config
from jaxllama.mixers import spec_of
from jaxllama.model import init_cache


@dataclass(frozen=True)
class KindPlan:
    """Cache bytes of all layers of one kind, whole batch, split two ways (module docstring)."""

    kind: str
    layers: int
    kv_growing: int  # floating leaves whose shape grows with max_len
    kv_constant: int
    bookkeeping_growing: int  # integer leaves (segment ids per position, counters)
    bookkeeping_constant: int
    recurrent: bool = False  # a recurrence (spec padding `state_reset`): its floats are state

    @property
    def kv_bytes(self) -> int:
        return self.kv_growing + self.kv_constant

    @property
    def state_bytes(self) -> int:
        """Floating bytes of a recurrent kind (SSM state, conv window): constant in max_len."""
        return self.kv_bytes if self.recurrent else 0

    @property
    def bookkeeping_bytes(self) -> int:
        return self.bookkeeping_growing + self.bookkeeping_constant

    @property
    def growing_bytes(self) -> int:
        return self.kv_growing + self.bookkeeping_growing

    @property
    def constant_bytes(self) -> int:
        return self.kv_constant + self.bookkeeping_constant

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.bookkeeping_bytes


@dataclass(frozen=True)
class CachePlan:
    positions: int  # ordinary tokens + memory tokens: the cache's max_len
    memory_tokens: int
    kinds: tuple[KindPlan, ...]  # in order of first appearance in the layer pattern

    def _sum(self, name: str) -> int:
        return sum(getattr(k, name) for k in self.kinds)

    @property
    def kv_bytes(self) -> int:
        return self._sum("kv_bytes")

    @property
    def state_bytes(self) -> int:
        return self._sum("state_bytes")

    @property
    def bookkeeping_bytes(self) -> int:
        return self._sum("bookkeeping_bytes")

    @property
    def growing_bytes(self) -> int:
        return self._sum("growing_bytes")

    @property
    def kv_growing_bytes(self) -> int:
        """Floating bytes that grow with the sequence: keys/values (or latents) only."""
        return self._sum("kv_growing")

    @property
    def constant_bytes(self) -> int:
        return self._sum("constant_bytes")

    @property
    def total_bytes(self) -> int:
        return self._sum("total_bytes")


def memory_positions(seq_len: int, memory_tokens: tuple[int, int] | None) -> int:
    """Memory-token positions planned for `seq_len` ordinary tokens (module docstring)."""
    if memory_tokens is None:
        return 0
    episode, per_episode = memory_tokens
    return (seq_len // episode) * per_episode


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> tuple:
    """`init_cache(cfg, batch, max_len, dtype)` as ShapeDtypeStructs: one stacked cache per run
    of `cfg.runs` (leading axis = layer in the run), nothing allocated."""
    return jax.eval_shape(lambda: init_cache(cfg, batch, max_len, dtype))


def _nbytes(leaf) -> int:
    return leaf.size * jnp.dtype(leaf.dtype).itemsize


def plan(cfg: ModelConfig, seq_len: int, batch: int = 1, dtype: str | None = None,
         memory_tokens: tuple[int, int] | None = None) -> CachePlan:
    """Bytes of the decode cache `init_cache(cfg, batch, positions, dtype)` allocates for
    `seq_len` ordinary tokens plus their memory tokens (cache dtype: the config's by default)."""
    if seq_len <= 0 or batch <= 0:
        raise ValueError(f"plan: seq_len and batch must be > 0, got {seq_len} and {batch}")
    cache_dtype = jnp.dtype(dtype or cfg.dtype)
    extra = memory_positions(seq_len, memory_tokens)
    positions = seq_len + extra
    at = cache_shapes(cfg, batch, positions, cache_dtype)
    # a leaf grows with the sequence iff its shape changes when max_len doubles
    longer = cache_shapes(cfg, batch, 2 * positions, cache_dtype)
    layers: dict[str, int] = {}
    split: dict[str, Counter] = {}  # kind -> {(floating, grows): bytes}
    for (kind, n), run, run_longer in zip(cfg.runs, at, longer, strict=True):
        layers[kind] = layers.get(kind, 0) + n
        counts = split.setdefault(kind, Counter())
        for leaf, leaf_longer in zip(jax.tree.leaves(run), jax.tree.leaves(run_longer),
                                     strict=True):
            floating = bool(jnp.issubdtype(leaf.dtype, jnp.floating))
            counts[floating, leaf.shape != leaf_longer.shape] += _nbytes(leaf)
    kinds = tuple(KindPlan(kind, layers[kind], kv_growing=c[True, True], kv_constant=c[True, False],
                           bookkeeping_growing=c[False, True], bookkeeping_constant=c[False, False],
                           recurrent=spec_of(kind).padding == "state_reset")
                  for kind, c in split.items())
    return CachePlan(positions, extra, kinds)


def _gb(n: int) -> str:
    return f"{n:,} B = {n / 1e9:.3f} GB"


def format_plan(cfg: ModelConfig, p: CachePlan, seq_len: int, batch: int, dtype: str,
                source: str) -> str:
    """The table the CLI prints: per kind, key/value bytes per layer and in all, and the whole
    cache (bookkeeping included) split into sequence-growing and constant bytes."""
    counts = ", ".join(f"{k.layers} {k.kind}" for k in p.kinds)
    lines = [f"config: {source} ({cfg.num_layers} layers: {counts})",
             (f"context: {seq_len:,} tokens + {p.memory_tokens:,} memory tokens = "
              f"{p.positions:,} positions; batch {batch}; cache dtype {dtype}"),
             (f"{'kind':<8}{'layers':>7}{'kv bytes/layer':>16}{'kv bytes':>16}"
              f"{'growing bytes':>16}{'constant bytes':>16}")]
    for k in p.kinds:
        lines.append(f"{k.kind:<8}{k.layers:>7}{k.kv_bytes // k.layers:>16,}{k.kv_bytes:>16,}"
                     f"{k.growing_bytes:>16,}{k.constant_bytes:>16,}")
    kv = p.kv_bytes - p.state_bytes
    lines.append(f"total keys/values: {_gb(kv)} ({kv / 2**30:.3f} GiB)")
    if any(k.recurrent for k in p.kinds):
        lines.append(f"recurrent state (SSM states, conv windows; constant in the context): "
                     f"{_gb(p.state_bytes)}")
    lines.append(f"bookkeeping (segment ids, lengths): {p.bookkeeping_bytes:,} B; "
                 f"allocated in all: {p.total_bytes:,} B")
    lines.append(f"whole cache, sequence-growing: {_gb(p.growing_bytes)}; "
                 f"constant: {_gb(p.constant_bytes)}")
    return "\n".join(lines)


def format_baseline(p: CachePlan, base: CachePlan, source: str) -> str:
    """The sequence-growing cache of `p` as a percent of `base`'s (planned at the same context,
    memory tokens, batch and cache dtype), last line; before it, when the baseline has growing
    keys/values, their percent alone: the share published KV-cache figures quote (it leaves
    out the bookkeeping that grows too, a segment id per position)."""
    if base.growing_bytes == 0:
        raise ConfigError(f"--baseline {source}: its cache does not grow with the sequence, "
                          "so there is nothing to take a percent of")
    lines = []
    if base.kv_growing_bytes:
        kv_pct = 100 * p.kv_growing_bytes / base.kv_growing_bytes
        lines.append(f"baseline {source}: sequence-growing keys/values "
                     f"{_gb(base.kv_growing_bytes)}; this model's are {kv_pct:.2f}% of them")
    pct = 100 * p.growing_bytes / base.growing_bytes
    lines.append(f"baseline {source}: sequence-growing {_gb(base.growing_bytes)}; "
                 f"this model's sequence-growing cache is {pct:.2f}% of it")
    return "\n".join(lines)


def load_config(path: str, overrides: list[str]) -> ModelConfig:
    """A model preset YAML, or an HF checkpoint directory (its config.json)."""
    p = Path(path)
    if p.is_dir():
        from jaxllama.checkpoint import mamba_hf
        from jaxllama.checkpoint.base import with_overrides
        from jaxllama.checkpoint.hf_config import config_from_hf
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{p}: a directory without config.json (expected an HF checkpoint)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{cfg_file}: not valid JSON") from None
        from_hf = mamba_hf.config_from_hf if mamba_hf.is_mamba_config(raw) else config_from_hf
        return with_overrides(from_hf(raw, str(cfg_file)), overrides, str(p))
    return load_model_config(p, overrides)


def _positive(name):
    def parse(value: str) -> int:
        try:
            out = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
        if out <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {out}")
        return out
    parse.__name__ = name
    return parse


def main(argv: list[str] | None = None) -> int:
    from jaxllama.cli import CliParser, memory_tokens_arg, model_overrides

    ap = CliParser(prog="python -m jaxllama.kvcache",
                 description="Print the decode-cache bytes per layer kind and in total.")
    ap.add_argument("--config", required=True, help="model preset YAML or HF checkpoint directory")
    ap.add_argument("--seq-len", required=True, type=_positive("seq-len"),
                    help="context length in ordinary tokens")
    ap.add_argument("--batch", type=_positive("batch"), default=1)
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="cache dtype (default: the config's compute dtype)")
    ap.add_argument("--memory-tokens", type=memory_tokens_arg, default=None, metavar="E:M",
                    help="M memory tokens after every E ordinary tokens, e.g. 256:8")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, e.g. model.layer_pattern=lambda (repeatable)")
    ap.add_argument("--baseline", default=None, metavar="CONFIG",
                    help="also print the sequence-growing cache as a percent of this model's "
                         "(same context, memory tokens, batch and cache dtype; no overrides)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, model_overrides(args.override))
        dtype = args.dtype or cfg.dtype
        p = plan(cfg, args.seq_len, args.batch, dtype, args.memory_tokens)
        baseline = None
        if args.baseline is not None:
            base = plan(load_config(args.baseline, []), args.seq_len, args.batch, dtype,
                        args.memory_tokens)
            baseline = format_baseline(p, base, args.baseline)
    except (ConfigError, ValueError, OSError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(cfg, p, args.seq_len, args.batch, dtype, args.config))
    if baseline is not None:
        print(baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
