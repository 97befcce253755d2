"""Throughput accounting (FLOPs per token, MFU) and metric sinks: JSONL, TensorBoard, progress bar.

FLOPs per token for a step (forward + backward = 3 x forward): 6 x the matmul parameters (every
`kernel`: projections, MLP and the LM head, which counts once even when tied; embedding lookups
are free) plus 3 x each layer's own forward FLOPs per token (its spec's `flops_per_token`:
attention scores and values, scans). MFU divides the achieved rate by the peak:
`log.peak_tflops` when set, a table of accelerators by device kind, or on CPU a measured float32
matmul rate (the simulated CPU devices share one host, so that is the whole run's peak).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax

from jaxllama.config import ModelConfig
from jaxllama.mixers import spec_of
from jaxllama.model import init_params

# dense bf16 peak FLOP/s per device, by a substring of `device.device_kind`
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: every `kernel` leaf of the model (shapes
    only, nothing allocated), plus the tied LM head, which is the embedding table."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    n = sum(x.size for path, x in leaves if getattr(path[-1], "key", None) == "kernel")
    return n + (cfg.hidden_size * cfg.vocab_size if cfg.tie_word_embeddings else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence length `seq_len`."""
    mixing = sum(spec_of(kind).flops_per_token(spec_of(kind).config(cfg), seq_len)
                 for kind in cfg.layer_pattern)
    return 6.0 * matmul_params(cfg) + 3.0 * mixing


def measure_cpu_flops(n: int = 1024, repeats: int = 5) -> float:
    """float32 matmul FLOP/s of this host (all cores), for CPU MFU."""
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops(peak_tflops_per_device: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of the whole run, where the number comes from)."""
    n = jax.device_count()
    if peak_tflops_per_device > 0:
        return peak_tflops_per_device * 1e12 * n, "config"
    kind = jax.devices()[0].device_kind
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops * n, f"table ({kind})"
    if jax.devices()[0].platform == "cpu":
        return measure_cpu_flops() * jax.process_count(), "measured cpu matmul"
    return 0.0, f"unknown device kind {kind!r}"


class MetricsLog:
    """Writes one JSON line per logged step (and TensorBoard scalars, and a tqdm bar), on the
    first process only. JSONL lines are appended, so a resumed run continues the same file."""

    def __init__(self, directory: str | Path | None, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        if directory is not None:
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(directory / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(directory / "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train",
                             dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0):.2e}",
                                  tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                                  mfu=f"{100 * row.get('mfu', 0):.1f}%", refresh=False)

    def close(self) -> None:
        for sink in (self._jsonl, self._tb, self._bar):
            if sink is not None:
                sink.close()


def _plain(v):
    try:
        return float(v) if not isinstance(v, (int, str)) else v
    except TypeError:
        return str(v)
