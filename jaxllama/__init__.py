"""jaxllama: Llama-family models in JAX/Flax for long context and cheap inference."""

from jaxllama import cpu_flags as _cpu_flags

_cpu_flags.apply()  # XLA:CPU flags by CPU features: before anything creates JAX's backend

from jaxllama.api import LLM, Completion, from_pretrained, save_pretrained
from jaxllama.config import AttentionConfig, KernelConfig, LambdaConfig, ModelConfig, RopeConfig
from jaxllama.inference import Engine, SamplingConfig
from jaxllama.model import Transformer, init_cache, init_params

__all__ = [
    "LLM", "AttentionConfig", "Completion", "Engine", "KernelConfig", "LambdaConfig",
    "ModelConfig", "RopeConfig", "SamplingConfig", "Transformer", "from_pretrained", "init_cache",
    "init_params", "save_pretrained",
]
