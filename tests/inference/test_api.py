"""Public API on a tiny random checkpoint: from_pretrained -> LLM (logits, generate with text and ids,
overrides), save_pretrained -> from_pretrained round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_hf):
    return make_tiny_hf("api", tie=False, kv_heads=1, context=128, seed=3)


def test_from_pretrained_generate_and_round_trip(tiny_dir, tmp_path):
    llm = jaxllama.from_pretrained(tiny_dir)
    assert isinstance(llm, jaxllama.LLM) and llm.config.num_layers == 2
    assert llm.eos_token_ids == [2] and llm.has_chat_template()
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, 49152)
    logits = llm(ids)
    assert logits.shape == (2, 9, 49152) and logits.dtype == jnp.float32

    # text (chat template) and raw ids give the same greedy tokens
    c = llm.generate("Hello!", max_new_tokens=6)
    again = llm.generate(llm.encode("Hello!"), max_new_tokens=6)
    assert c.token_ids == again.token_ids and c.prompt_tokens == len(llm.encode("Hello!"))
    both = llm.generate(["Hello!", "A longer second prompt, padded against the first."],
                        max_new_tokens=6)
    assert isinstance(both, list) and both[0].token_ids == c.token_ids
    assert c.to_json()["text"] == c.text

    out = jaxllama.save_pretrained(llm, tmp_path / "saved")
    back = jaxllama.from_pretrained(out)
    assert back.config == llm.config
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(llm.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(logits))


def test_overrides_and_dtype(tiny_dir):
    llm = jaxllama.from_pretrained(tiny_dir, "bfloat16",
                                   ["model.layer_pattern=dense,lambda",
                                    "model.lambda.window=4", "model.lambda.global_tokens=2"])
    assert llm.config.layer_pattern == ("dense", "lambda")
    assert jax.tree.leaves(llm.params)[0].dtype == jnp.bfloat16
    assert llm(np.ones((1, 5), np.int32)).dtype == jnp.float32
