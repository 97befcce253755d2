"""jaxllama: Llama-family models in JAX/Flax for long context and cheap inference."""

from jaxllama.config import KernelConfig, LambdaConfig, ModelConfig, RopeConfig, AttentionConfig
from jaxllama.model import Transformer, init_cache, init_params

__all__ = ["ModelConfig", "AttentionConfig", "RopeConfig", "LambdaConfig", "KernelConfig",
           "Transformer", "init_cache", "init_params"]
