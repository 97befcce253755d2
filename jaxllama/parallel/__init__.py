"""Context parallelism over the `seq` mesh axis: ring attention, all-gather K/V, the lambda halo
exchange, zigzag layout."""

from jaxllama.parallel.context import allgather_attention, context_attend
from jaxllama.parallel.halo import halo_lambda_attend
from jaxllama.parallel.layout import from_zigzag, to_zigzag, zigzag_indices
from jaxllama.parallel.ring_attention import ring_attention

__all__ = [
           "allgather_attention",
           "context_attend",
           "from_zigzag",
           "halo_lambda_attend",
           "ring_attention",
           "to_zigzag",
           "zigzag_indices",
]
