"""Memory-token insertion, its inverse, the loss mask, and growing the vocabulary."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxllama.config import AttentionConfig, ModelConfig
from jaxllama.memory_tokens import (
    ensure_memory_token,
    generate_with_memory_tokens,
    insert_memory_tokens,
    memory_insert_count,
    memory_token_loss_mask,
    parse_memory_tokens,
    remove_memory_tokens,
)
from jaxllama.model import Transformer

MEM = 999


def test_insert_literal():
    ids = list(range(1, 8))  # 7 tokens, episodes of 3 -> after 3 and 6, not after 7
    out = insert_memory_tokens(ids, episode_length=3, num_memory_tokens_per_episode=2,
                               memory_token_id=MEM)
    assert out == [1, 2, 3, MEM, MEM, 4, 5, 6, MEM, MEM, 7]
    assert remove_memory_tokens(out, MEM) == ids


def test_no_memory_after_last_full_chunk():
    out = insert_memory_tokens(list(range(6)), 3, 2, MEM)
    assert out == [0, 1, 2, MEM, MEM, 3, 4, 5]
    assert insert_memory_tokens(list(range(3)), 3, 2, MEM) == [0, 1, 2]
    assert insert_memory_tokens([], 3, 2, MEM) == []


@pytest.mark.parametrize("t", [1, 255, 256, 257, 700, 1024])
def test_batched_roundtrip_and_count(t):
    rng = np.random.default_rng(t)
    ids = rng.integers(0, 500, (3, t))
    out = insert_memory_tokens(ids, memory_token_id=MEM)
    assert out.shape == (3, t + memory_insert_count(t))
    assert memory_insert_count(t) == 8 * max(-(-t // 256) - 1, 0)
    # every row identical structure: memory tokens exactly at [k*264 + 256, k*264 + 264)
    is_mem = out == MEM
    for k in range(-(-t // 256) - 1):
        assert is_mem[:, k * 264 + 256: k * 264 + 264].all()
    assert is_mem.sum() == 3 * memory_insert_count(t)
    np.testing.assert_array_equal(remove_memory_tokens(out, MEM), ids)
    mask = memory_token_loss_mask(out, MEM)
    np.testing.assert_array_equal(mask, ~is_mem)


def test_jax_arrays_stay_jax():
    ids = jax.random.randint(jax.random.key(0), (2, 20), 0, 100)
    out = insert_memory_tokens(ids, 8, 1, MEM)
    assert isinstance(out, jax.Array) and out.shape == (2, 22)
    back = remove_memory_tokens(out, MEM)
    assert isinstance(back, jax.Array)
    np.testing.assert_array_equal(back, ids)
    mask = memory_token_loss_mask(out, MEM)
    assert isinstance(mask, jax.Array) and int(mask.sum()) == 40


def test_bad_inputs():
    with pytest.raises(ValueError, match="memory_token_id"):
        insert_memory_tokens([1, 2, 3])
    with pytest.raises(ValueError, match="episode_length"):
        insert_memory_tokens([1, 2, 3], 0, 8, MEM)
    with pytest.raises(ValueError, match="different numbers"):
        remove_memory_tokens(np.array([[1, MEM], [2, 3]]), MEM)
    assert parse_memory_tokens("256:8") == (256, 8)
    for bad in ("256", "a:8", "0:8", "256:-1", "1:2:3"):
        with pytest.raises(ValueError, match="--memory-tokens"):
            parse_memory_tokens(bad)


def _tokenizer(n=40):
    vocab = {f"w{i}": i for i in range(n)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def jit_init(cfg, seed):
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    return nn.meta.unbox(variables["params"])


@pytest.mark.parametrize("tied", [False, True])
def test_ensure_memory_token_grows_vocab(tied):
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, layer_pattern=("dense",),
                      attention=AttentionConfig(num_heads=2, num_kv_heads=1),
                      tie_word_embeddings=tied)
    params = jit_init(cfg, 1)
    tok = _tokenizer()
    mid, params2, cfg2 = ensure_memory_token(tok, params, cfg)
    assert mid == 40 and cfg2.vocab_size == 41 and len(tok) == 41
    assert tok.convert_tokens_to_ids("<|memory|>") == 40
    assert tok.encode("w3 <|memory|> w5") == [3, 40, 5]
    emb = params2["embed"]["embedding"]
    assert emb.shape == (41, 32)
    np.testing.assert_array_equal(emb[:40], params["embed"]["embedding"])
    np.testing.assert_allclose(emb[40], params["embed"]["embedding"].mean(0), rtol=1e-6)
    assert ("lm_head" in params2) == (not tied)
    if not tied:
        assert params2["lm_head"]["kernel"].shape == (32, 41)
    ids = jnp.array([[3, 40, 5]])
    logits, _ = jax.jit(Transformer(cfg2).apply)({"params": params2}, ids)
    assert logits.shape == (1, 3, 41) and bool(jnp.isfinite(logits).all())
    # idempotent: a second call finds the token and changes nothing
    mid2, params3, cfg3 = ensure_memory_token(tok, params2, cfg2)
    assert mid2 == mid and cfg3 is cfg2 and params3 is params2


def test_ensure_memory_token_existing_slot():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, layer_pattern=("dense",),
                      attention=AttentionConfig(num_heads=2, num_kv_heads=1))
    params = jit_init(cfg, 2)
    mid, params2, cfg2 = ensure_memory_token(_tokenizer(), params, cfg, token="<mem>")
    assert mid == 40 and cfg2 is cfg and params2 is params  # padded vocab already has the row


@pytest.mark.parametrize("prompt_len,max_new,eos_at", [(5, 30, None), (8, 17, None), (3, 40, 19)])
def test_generate_with_memory_tokens_layout(prompt_len, max_new, eos_at):
    """Every round sees exactly the layout insert_memory_tokens gives the ordinary tokens so far,
    plus the memory block when the next ordinary token starts an episode."""
    e, m, eos = 4, 2, 7
    calls = []
    rng = np.random.default_rng(prompt_len)
    produced = iter(int(x) for x in rng.integers(10, 50, 100))
    made = []

    def fake_generate(ids, n):
        calls.append((list(ids), n))
        out = []
        for _ in range(n):
            out.append(eos if eos_at is not None and len(made) == eos_at else next(produced))
            made.append(out[-1])
            if out[-1] == eos:
                break
        return out

    prompt = list(range(20, 20 + prompt_len))
    out = generate_with_memory_tokens(fake_generate, prompt, max_new, e, m, MEM, eos_ids=[eos])
    assert out == made
    assert len(out) == (eos_at + 1 if eos_at is not None else max_new)
    assert all(0 < n <= e for _, n in calls)
    for ids, _ in calls:
        ordinary = remove_memory_tokens(ids, MEM)
        expect = insert_memory_tokens(ordinary, e, m, MEM)
        if len(ordinary) % e == 0:
            expect = expect + [MEM] * m
        assert ids == expect
        assert ordinary == (prompt + out)[:len(ordinary)]
