"""Generation: jitted prefill, on-device decode loop, sampling, streaming detokenization."""

from jaxllama.inference.engine import Engine, GenerationError, GenerationOutput
from jaxllama.inference.sampling import SamplingConfig, SamplingError, sample
from jaxllama.inference.streaming import TextStream

__all__ = [
    "Engine", "GenerationError", "GenerationOutput", "SamplingConfig", "SamplingError",
    "TextStream", "sample",
]
