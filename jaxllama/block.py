"""Residual block: norm -> mixer -> +x -> norm -> mlp -> +x (no MLP when intermediate_size is 0)."""

from __future__ import annotations

import flax.linen as nn

from jaxllama.config import ModelConfig
from jaxllama.layers.basic import MLP, RMSNorm, dtype_of
from jaxllama.mixers import spec_of
from jaxllama.sharding import constrain


class Block(nn.Module):
    cfg: ModelConfig
    kind: str

    @nn.compact
    def __call__(self, x, positions, cache=None, segment_ids=None):
        c = self.cfg
        kw = {"dtype": dtype_of(c.dtype), "param_dtype": dtype_of(c.param_dtype)}
        spec = spec_of(self.kind)
        mixer = spec.module(cfg=spec.config(c), kernels=c.kernels, name="mixer", **kw)
        y, cache = mixer(RMSNorm(c.rms_norm_eps, name="mixer_norm", **kw)(x), positions, cache,
                         segment_ids)
        x = x + y
        if c.intermediate_size:
            x = x + MLP(c.hidden_size, c.intermediate_size, name="mlp", **kw)(
                RMSNorm(c.rms_norm_eps, name="mlp_norm", **kw)(x))
        return constrain(x, ("batch", "seq", "act_embed")), cache
