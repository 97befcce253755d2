"""One file per layer kind: the mixer module and its cache class.

`MIXERS[kind] = (module class, cache class)`. Every mixer is built as
`Module(cfg=model_cfg.mixer_config(kind), kernels=..., dtype=..., param_dtype=...)` and called as
`(x, positions, cache=None, segment_ids=None) -> (y, cache)`. A module class's `context_limited`
says whether a sequence must fit in `max_position_embeddings`.
"""

from jaxllama.mixers.attention import Attention, KVCache
from jaxllama.mixers.lambda_attention import LambdaAttention, LambdaCache

MIXERS = {
    "dense": (Attention, KVCache),
    "lambda": (LambdaAttention, LambdaCache),
}

__all__ = ["MIXERS", "Attention", "KVCache", "LambdaAttention", "LambdaCache"]
