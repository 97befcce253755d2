"""What a layer kind says about itself: `MixerSpec` and `HFTensor`.

Each mixer file (`mixers/<kind>.py`) exports one `SPEC`; `mixers/__init__.py` collects them into
`REGISTRY`. Code outside `mixers/` asks the registry (`spec_of(kind)`) instead of comparing kind
names: config validation, the cache planner, checkpoints, MFU, context parallelism, the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class HFTensor:
    """One HF tensor of a layer's mixer and where it lives in that layer's block tree.

    `hf_name` is relative to the layer prefix (`self_attn.q_proj.weight` under
    `model.layers.{l}.`), `path` relative to the block (`("mixer", "q_proj", "kernel")`). HF
    matrices are [out, in] and ours [in..., out...]: a matrix is transposed then reshaped
    (`transpose`); vectors are only reshaped.
    """

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transpose: bool


@dataclass(frozen=True)
class Rollback:
    """Undo the last tokens of a cached call: what speculative decoding needs of a cache.

    A verification step appends t tokens (the pending token and t - 1 draft tokens) in one cached
    call, then keeps only the first `keep` of them (1 <= keep <= t; the rest were rejected). The
    engine brackets that call with the two functions, per layer (vmapped over a run's layer axis):

        cache, saved = rollback.begin(cache, t)      # before the call; t is a Python int
        ... y, cache = mixer(x [B t D], positions, cache, segment_ids) ...
        cache = rollback.end(cache, saved, keep)     # keep: a traced int32 scalar

    The contract: the cache `end` returns is equivalent to one that was given only the first
    `keep` tokens (a later call computes the same outputs from it). `keep` is the same for every
    row of the batch. `begin` may return a different cache pytree (e.g. one with extra per-step
    buffers) that the mixer's cached call fills; `end` must return the cache's own class and
    shapes again. Both run inside the jitted decode loop, so they cost per step: they should be
    O(t) in time and memory, never O(cache length). `begin` raises ValueError (one line naming
    the limit) when t is more than the kind can undo.

    - attention caches (dense): `begin` saves the length, `end` sets it to start + keep (the
      slots past it are masked as future keys and overwritten by the next append);
    - a ring buffer (lambda): `begin` saves the t slots the call will overwrite (t <= window),
      `end` puts back those of the rejected tokens and hides sinks written for them;
    - a constant-state recurrence (Mamba-style SSM, conv state): storing every state of the
      sequence is not needed. Either `begin` returns the cache with a per-step buffer for this
      window only ([B t ...]: the t + 1 states the scan passes through, constant in sequence
      length) that the cached call fills, and `end` picks state `keep` from it; or `begin` saves
      the state before the window, the call records the window's per-step scan inputs (e.g. the
      discretised A and B x, parameter-free), and `end` re-runs the first `keep` steps of the
      recurrence from the saved state.
    """

    begin: Callable[[Any, int], tuple[Any, Any]]
    end: Callable[[Any, Any, Any], Any]


@dataclass(frozen=True)
class MixerSpec:
    """A layer kind: its module, cache and sub-config, capabilities, HF tensors and FLOPs.

    - `config_field`: the `ModelConfig` field holding this kind's own knobs (None: the kind has
      none beyond the model's), the same as `config.KIND_FIELDS[kind]` (checked at import); the
      mixer's sub-config is `config_cls.from_model(model_cfg)`, which holds what it needs.
    - `context_limited`: a sequence must fit in the model's `max_position_embeddings`.
    - `context_parallel`: the `kernels.context_parallel` modes a training pass of this kind runs
      (empty: none; `none` is always allowed).
    - `uses_rope`: the mixer rotates by the `positions` argument.
    - `padding`: how a padded position is made invisible (`segment_ids`: masked by segment id 0;
      `state_reset`: a recurrence that skips it).
    - `cache_growth`: `linear` (bytes grow with max_len) or `constant`.
    - `hf_tensors(sub_cfg)`: the mixer's HF tensors of one layer (None: no HF layout).
    - `flops_per_token(sub_cfg, seq_len)`: forward FLOPs per token that are not products with
      parameters (attention scores and values, scans); the trainer adds 2 x params itself.
    - `prefill_chunk(sub_cfg, n)`: the prefill chunk this kind needs for an n-token prompt (None:
      the engine's own); a kind that windows a prompt itself (FoT) takes it whole, unpadded.
    - `decode_params(sub_cfg, mixer_params)`: the mixer's params plus what its decode step reads
      in another form (MLA's absorbed W_UK / W_UV), built once by
      `inference.decode.decode_weights`, not per step; leading (layer) axes pass through.
      None: decode reads the params as they are.
    - `rollback`: how speculative decoding undoes rejected tokens (`Rollback`; None: the kind
      cannot be speculated on, and the engine refuses a draft for a model that has it).
    """

    kind: str
    module: type
    cache: type
    config_cls: type
    config_field: str | None
    context_limited: bool
    context_parallel: tuple[str, ...]
    uses_rope: bool
    padding: Literal["segment_ids", "state_reset"]
    cache_growth: Literal["linear", "constant"]
    hf_tensors: Callable[[Any], tuple[HFTensor, ...]] | None
    flops_per_token: Callable[[Any, int], float]
    prefill_chunk: Callable[[Any, int], int] | None = None
    decode_params: Callable[[Any, dict], dict] | None = None
    rollback: Rollback | None = None

    def config(self, model_cfg) -> Any:
        """The sub-config the mixer of this kind is built with."""
        return self.config_cls.from_model(model_cfg)


__all__ = ["HFTensor", "MixerSpec", "Rollback"]
