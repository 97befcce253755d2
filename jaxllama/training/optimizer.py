"""AdamW with linear warmup and cosine / linear / constant decay, after global-norm clipping."""

from __future__ import annotations

import jax
import optax


def lr_schedule(lr: float, steps: int, warmup_steps: int = 0, decay: str = "cosine",
                min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Warm up linearly from 0 to `lr` over `warmup_steps`, then decay to `lr * min_lr_ratio` at
    `steps` (cosine or linear), or stay at `lr` (constant)."""
    warmup_steps = min(warmup_steps, steps)
    rest = max(steps - warmup_steps, 1)
    end = lr * min_lr_ratio
    if decay == "cosine":
        tail = optax.cosine_decay_schedule(lr, rest, alpha=min_lr_ratio)
    elif decay == "linear":
        tail = optax.linear_schedule(lr, end, rest)
    elif decay == "constant":
        tail = optax.constant_schedule(lr)
    else:
        raise ValueError(f"schedule {decay!r} is not one of cosine, linear, constant")
    if warmup_steps == 0:
        return tail
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), tail],
                                [warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices only: norm scales and biases (leaf names `scale`, `bias`) are
    exempt (their rank cannot tell them apart, since layer-stacked norms are 2-D)."""
    def keep(path, _):
        return getattr(path[-1], "key", None) not in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0
                   ) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW (no decay on norms and biases)."""
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts)
