"""The zigzag load-balanced sequence layout for causal context parallelism (METHODS section 4).

The sequence is cut into 2W chunks of C tokens; device r of the `seq` axis holds chunks r and
2W-1-r, so every device does the same amount of causal work. The data pipeline applies the layout
to every per-token array (tokens, targets, loss weights, positions, segment ids) before the batch
is sharded over `seq`; positions keep their true values, so RoPE sees global positions. The loss
is a sum over tokens, so it is unchanged by the permutation.
"""

from __future__ import annotations

import numpy as np


def zigzag_indices(length: int, ways: int) -> np.ndarray:
    """`perm` with `zigzag[i] = natural[perm[i]]` for a sequence of `length` split over `ways`."""
    if length % (2 * ways):
        raise ValueError(f"sequence length {length} is not divisible by 2 x {ways} (zigzag layout)")
    c = length // (2 * ways)
    chunks = []
    for r in range(ways):
        chunks += [np.arange(r * c, (r + 1) * c), np.arange((2 * ways - 1 - r) * c,
                                                            (2 * ways - r) * c)]
    return np.concatenate(chunks)


def to_zigzag(x, ways: int, axis: int = 1):
    """Natural -> zigzag order along `axis` (numpy or jax arrays)."""
    if ways <= 1:
        return x
    return x.take(zigzag_indices(x.shape[axis], ways), axis=axis)


def from_zigzag(x, ways: int, axis: int = 1):
    """Zigzag -> natural order along `axis`."""
    if ways <= 1:
        return x
    return x.take(np.argsort(zigzag_indices(x.shape[axis], ways)), axis=axis)
