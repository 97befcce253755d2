"""Guard for jax#40101 (since JAX 0.11.1 a small update inside a loop can rewrite the whole
buffer): in the compiled decode loop, and in the speculative loop, the KV cache must be updated
in place. XLA:CPU writes a dynamic-update-slice in place when it is the root of its fusion and
its buffer is the loop's own; a whole-cache rewrite shows up as a `copy` of the cache-shaped
buffer or as a cache-shaped fusion with another root. Both are checked in the optimised HLO, so
a JAX upgrade cannot silently make decode O(cache length) per token."""

import functools
import re

import jax
import pytest

from jaxllama import AttentionConfig, ModelConfig, init_params
from jaxllama.inference.engine import Engine
from jaxllama.inference.speculative import NgramDraft

SLOTS = 384  # cache slots for a 3-token prompt (bucket 16) and 300 new tokens
CACHE = f"f32[1,{SLOTS},2,8]"  # [B S K H] of each layer's k and v


@pytest.fixture(scope="module")
def engine():
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                      layer_pattern=("dense",) * 2, max_position_embeddings=1024,
                      tie_word_embeddings=True, attention=AttentionConfig(num_heads=4,
                                                                          num_kv_heads=2))
    return Engine(cfg, jax.jit(functools.partial(init_params, cfg))(jax.random.key(0)))


def compiled_text(engine, name):
    texts = [c.as_text() for key, c in engine._compiled.items()
             if key[0] == name or (isinstance(key[0], tuple) and key[0][0] == name)]
    assert len(texts) == 1, [k[0] for k in engine._compiled]
    return texts[0]


def cache_writes(hlo: str):
    """(copies, fusions) producing a cache-shaped array: instruction names and opcodes."""
    pat = re.compile(r"%(\S+) = " + re.escape(CACHE) + r"\{[\d,]*\} (\S+?)\(")
    found = pat.findall(hlo)
    copies = [n for n, op in found if op in ("copy", "copy-start")]
    fusions = [n for n, op in found if op == "fusion"]
    return copies, fusions


@pytest.mark.parametrize("draft", [None, NgramDraft(tokens=3)], ids=["plain", "speculative"])
def test_decode_updates_the_cache_in_place(engine, draft):
    out = engine.generate([[1, 2, 3]], 300, draft=draft, eos_ids=[0])
    assert out.tokens.shape[0] == 1
    hlo = compiled_text(engine, "spec" if draft else "chunk")
    copies, fusions = cache_writes(hlo)
    assert not copies, f"the decode loop copies whole caches: {copies}"
    # k and v of 2 layers, each written by one fusion rooted at the dynamic-update-slice
    assert len(fusions) >= 4, fusions
    assert all("dynamic-update-slice" in n for n in fusions), fusions
