"""Next-token cross-entropy that never materialises the full [B T V] logits.

Following the Mini-Sequence Transformer idea, the final hidden states [B T D] are cut into
`T / chunk` pieces of `chunk` tokens; a `lax.scan` applies the LM head and the log-softmax to one
piece at a time under `jax.checkpoint`, so the forward keeps only [B chunk V] logits alive and the
backward recomputes them piece by piece. Pieces take every (T / chunk)-th token
(`h.reshape(B, chunk, T / chunk, D)`): with the sequence sharded over the `seq` mesh axis each
device then works on its own tokens in every piece, and no activation moves between devices.

Losses are returned as (sum of weighted token losses, sum of weights), so gradient accumulation
and multi-device reductions divide once, by the true token count of the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllama.model import Transformer


def token_losses(logits, targets):
    """-log p(target) [..] from float32 logits [.. V] and int targets [..]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def chunked_cross_entropy(model: Transformer, params, hidden, targets, weights, chunk: int):
    """(sum_t w_t * nll_t, sum_t w_t) over hidden [B T D], targets [B T], weights [B T].

    `chunk` = tokens per piece; 0 (or >= T) computes the full [B T V] logits at once."""
    b, t, _ = hidden.shape
    weights = weights.astype(jnp.float32)

    def piece(params, h, y, w):  # h [B C D], y, w [B C]
        logits = model.apply({"params": params}, h, method=Transformer.logits)  # [B C V] f32
        return jnp.sum(token_losses(logits, y) * w)

    if chunk <= 0 or chunk >= t:
        return piece(params, hidden, targets, weights), jnp.sum(weights)
    if t % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {t}")
    n = t // chunk
    # [B T ..] -> [n B chunk ..]: piece j holds tokens j, j + n, j + 2n, ...
    split = lambda a: jnp.moveaxis(a.reshape((b, chunk, n) + a.shape[2:]), 2, 0)
    piece_ckpt = jax.checkpoint(piece)

    def body(total, xs):
        h, y, w = xs
        return total + piece_ckpt(params, h, y, w), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (split(hidden), split(targets), split(weights)))
    return total, jnp.sum(weights)
