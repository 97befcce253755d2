"""Axis-letter glossary and array aliases used in shape comments and signatures.

The aliases are jaxtyping annotations for readers (the mixer signatures use them); nothing checks
them at run time.

Letters (used in every einsum string and `# [..]` shape comment):

  B batch            T query tokens of this call   S key / cache positions
  D model width      F MLP width                   V vocabulary
  N query heads      K kv heads                    G = N / K (query heads per kv head)
  H head dim         U value head dim (MLA)        L MLA latent width
  R rope dims        E SSM inner width             Z SSM state
  W window or conv width                           C chunk
  M memory slots
"""

from __future__ import annotations

from typing import Any

import jax
from jaxtyping import Array, Float, Int

PyTree = Any
Params = Any  # the `params` collection of a linen module: nested dict of arrays
PRNGKey = jax.Array

Tokens = Int[Array, "B T"]
Positions = Int[Array, "B T"]
SegmentIds = Int[Array, "B T"]  # 0 = padding; packed documents 1, 2, ...
Hidden = Float[Array, "B T D"]
Logits = Float[Array, "B T V"]
Queries = Float[Array, "B T N H"]
KeysValues = Float[Array, "B T K H"]

__all__ = ["Array", "Float", "Hidden", "Int", "KeysValues", "Logits", "PRNGKey", "Params",
           "Positions", "PyTree", "Queries", "SegmentIds", "Tokens"]
