"""Linear maps, embeddings, RMSNorm and the SwiGLU MLP, with logical axis names on every weight."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

default_init = nn.initializers.normal(stddev=0.02)


def dtype_of(name: str):
    return jnp.dtype(name)


class Linear(nn.Module):
    """y = x . W over the last `len(in_shape)` axes of x; W [*in_shape, *out_shape] with logical axes.

    The einsum contracts named axes so projections keep head structure ([D] -> [N H]) without
    reshapes, which keeps the tensor-parallel sharding of heads visible to XLA. Products accumulate
    in float32 whatever `dtype` (XLA:CPU's fast bfloat16 path; what accelerators do anyway), and
    the result is rounded to `dtype`.
    """

    in_shape: Sequence[int]
    out_shape: Sequence[int]
    axes: Sequence[str]  # logical names of W's axes, len(in_shape) + len(out_shape)
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = default_init

    @nn.compact
    def __call__(self, x):
        shape = tuple(self.in_shape) + tuple(self.out_shape)
        w = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)),
                       shape, self.param_dtype)
        n_in = len(self.in_shape)
        letters = "abcdefgh"
        xs = "..." + letters[:n_in]
        ws = letters[:n_in] + letters[n_in:n_in + len(self.out_shape)]
        y = jnp.einsum(f"{xs},{ws}->...{ws[n_in:]}", x.astype(self.dtype), w.astype(self.dtype),
                       preferred_element_type=jnp.float32).astype(self.dtype)
        if self.use_bias:
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               tuple(self.axes[n_in:])),
                           tuple(self.out_shape), self.param_dtype)
            y = y + b.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """x / rms(x) * w, statistics in float32, then cast back (transformers' LlamaRMSNorm order)."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * xf.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding [V D]; `attend` gives the tied LM head."""

    vocab_size: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(default_init, ("vocab", "embed")),
            (self.vocab_size, self.features), self.param_dtype)

    def __call__(self, ids):
        # Gather from a table whole along `embed` (the all-gather FSDP does anyway): a gather from
        # the [vocab/tensor, embed/fsdp] table yields rows split along `embed`, which XLA's
        # partitioner cannot reshard to the batch-split activations without replicating them.
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x):
        # [B T D] x [V D] -> [B T V], accumulated in float32 like `Linear`, returned in float32
        return jnp.einsum("btd,vd->btv", x, self.embedding.astype(self.dtype),
                          preferred_element_type=jnp.float32)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    A decode copy of the weights may hold `gate_up` [D 2 F] (gate and up side by side,
    `fuse_mlp_params`) instead of `gate` and `up`: one matrix-vector product per token instead of
    two (fewer dispatched ops on CPU, one longer read); the stored params never have it."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        d, f = self.hidden_size, self.intermediate_size
        if self.has_variable("params", "gate_up"):  # the fused decode copy
            both = Linear((d,), (2, f), ("embed", None, "mlp"), name="gate_up", **kw)(x)
            gate, up = both[..., 0, :], both[..., 1, :]  # [B T 2 F] -> 2 x [B T F]
        else:
            gate = Linear((d,), (f,), ("embed", "mlp"), name="gate", **kw)(x)
            up = Linear((d,), (f,), ("embed", "mlp"), name="up", **kw)(x)
        return Linear((f,), (d,), ("mlp", "embed"), name="down", **kw)(nn.silu(gate) * up)


def fuse_mlp_params(params: dict) -> dict:
    """An `MLP`'s params with `gate` and `up` [.. D F] replaced by `gate_up` [.. D 2 F] (leading
    layer axes pass through): what `MLP` reads in place of the two."""
    gate, up = params["gate"]["kernel"], params["up"]["kernel"]
    rest = {k: v for k, v in params.items() if k not in ("gate", "up")}
    return {**rest, "gate_up": {"kernel": jnp.stack([gate, up], axis=-2)}}
