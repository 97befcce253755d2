"""Logical axis names, the one rules table mapping them to mesh axes, and `constrain`.

Model code names logical axes only ("batch", "embed", "heads", ...); only this file knows the mesh
axes `data`, `fsdp`, `tensor`, `seq`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor", "seq")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", "seq"),
    ("cache_seq", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("mlp", "tensor"),
    ("act_mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("act_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("act_vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)


def constrain(x, names: Sequence[str | None]):
    """Sharding constraint by logical names; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, tuple(names))
