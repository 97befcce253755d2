"""KV-cache planner: bytes the decode cache of a model takes at a given context length.

    python -m jaxllama.kvcache --config configs/models/cbhybrid-m-8b.yaml --seq-len 16384 \\
        --memory-tokens 256:8

prints, per layer kind, the entries each layer holds and the key/value bytes, then the total
(METHODS section 6 reproduces exactly: Llama-3.1-8B 2.147 GB at 16K, CBHybrid-M 1.275 GB and
CBHybrid-L 1.376 GB with memory tokens 256:8). A dense layer holds every position of the context;
a lambda layer holds G sinks plus a window of L whatever the length. Key/value bytes are what the
published figures count; the few bytes of bookkeeping (segment ids, lengths) are listed apart.

With memory tokens E:M a context of N ordinary tokens is planned with floor(N / E) * M memory
positions: the steady state of a conversation that keeps growing, where the M tokens follow each
completed episode (`insert_memory_tokens` on a finished text omits the block after its last episode).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp

from jaxllama.config import DTYPES, ConfigError, ModelConfig, load_model_config


@dataclass(frozen=True)
class KindPlan:
    kind: str
    layers: int
    entries: int  # cache positions per layer and sequence
    kv_bytes: int  # keys + values, all layers of this kind, whole batch
    bookkeeping_bytes: int  # segment ids and length counters


@dataclass(frozen=True)
class CachePlan:
    positions: int  # ordinary tokens + memory tokens
    memory_tokens: int
    kinds: tuple[KindPlan, ...]

    @property
    def kv_bytes(self) -> int:
        return sum(k.kv_bytes for k in self.kinds)

    @property
    def bookkeeping_bytes(self) -> int:
        return sum(k.bookkeeping_bytes for k in self.kinds)


def cache_entries(cfg: ModelConfig, kind: str, positions: int) -> int:
    """Cache positions one layer of `kind` holds for a context of `positions` tokens."""
    if kind == "dense":
        return positions
    if kind == "lambda":
        return cfg.lambda_.global_tokens + cfg.lambda_.window
    raise ConfigError(f"layer_pattern: the planner has no cache formula for layer kind {kind!r}")


def memory_positions(seq_len: int, memory_tokens: tuple[int, int] | None) -> int:
    if memory_tokens is None:
        return 0
    episode, per_episode = memory_tokens
    return (seq_len // episode) * per_episode


def plan(cfg: ModelConfig, seq_len: int, batch: int = 1, dtype: str | None = None,
         memory_tokens: tuple[int, int] | None = None) -> CachePlan:
    """Bytes of the decode cache `init_cache(cfg, batch, positions, dtype)` allocates."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    extra = memory_positions(seq_len, memory_tokens)
    positions = seq_len + extra
    att = cfg.attention
    kinds = []
    for kind in dict.fromkeys(cfg.layer_pattern):  # first-appearance order
        layers = cfg.layer_pattern.count(kind)
        entries = cache_entries(cfg, kind, positions)
        kv = 2 * layers * batch * entries * att.num_kv_heads * att.head_dim * itemsize
        # int32 segment id per entry and a length counter; lambda rows also keep their first slot
        book = layers * (batch * entries * 4 + 4 + (batch * 4 if kind == "lambda" else 0))
        kinds.append(KindPlan(kind, layers, entries, kv, book))
    return CachePlan(positions, extra, tuple(kinds))


def format_plan(cfg: ModelConfig, p: CachePlan, seq_len: int, batch: int, dtype: str,
                source: str) -> str:
    counts = ", ".join(f"{k.layers} {k.kind}" for k in p.kinds)
    lines = [f"config: {source} ({cfg.num_layers} layers: {counts})",
             (f"context: {seq_len:,} tokens + {p.memory_tokens:,} memory tokens = "
              f"{p.positions:,} positions; batch {batch}; cache dtype {dtype}"),
             f"{'kind':<8}{'layers':>8}{'entries/layer':>15}{'bytes/layer':>16}{'bytes':>18}"]
    for k in p.kinds:
        per_layer = k.kv_bytes // k.layers
        lines.append(f"{k.kind:<8}{k.layers:>8}{k.entries:>15,}{per_layer:>16,}{k.kv_bytes:>18,}")
    lines.append(f"total keys/values: {p.kv_bytes:,} B = {p.kv_bytes / 1e9:.3f} GB "
                 f"({p.kv_bytes / 2**30:.3f} GiB)")
    lines.append(f"bookkeeping (segment ids, lengths): {p.bookkeeping_bytes:,} B; "
                 f"allocated in all: {p.kv_bytes + p.bookkeeping_bytes:,} B")
    return "\n".join(lines)


def load_config(path: str, overrides: list[str]) -> ModelConfig:
    """A model preset YAML, or an HF checkpoint directory (its config.json)."""
    p = Path(path)
    if p.is_dir():
        from jaxllama.checkpoint.base import with_overrides
        from jaxllama.checkpoint.hf_config import config_from_hf
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{p}: a directory without config.json (expected an HF checkpoint)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{cfg_file}: not valid JSON") from None
        return with_overrides(config_from_hf(raw, str(cfg_file)), overrides, str(p))
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
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, model_overrides(args.override))
        dtype = args.dtype or cfg.dtype
        p = plan(cfg, args.seq_len, args.batch, dtype, args.memory_tokens)
    except (ConfigError, ValueError, OSError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(cfg, p, args.seq_len, args.batch, dtype, args.config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
