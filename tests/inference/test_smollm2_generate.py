"""The real SmolLM2-135M-Instruct (embedded GGUF): the engine's greedy tokens equal transformers'
greedy `generate` on the same GGUF, for two prompts batched together; streaming text equals the
final text, multi-byte characters included."""

import numpy as np
import pytest
import torch

from jaxllama.api import LLM
from jaxllama.inference.streaming import TextStream

PROMPTS = ["Explain in three sentences why the sky is blue.",
           "Write a long story about a robot who learns to paint."]


@pytest.fixture(scope="module")
def llm(smollm2_jax):
    ck = smollm2_jax
    return LLM(ck.config, ck.params, ck.tokenizer, ck.generation_config, ck.source)


def test_greedy_32_tokens_match_transformers_batched(llm, smollm2_hf):
    model, _ = smollm2_hf
    ids = [llm.encode(p) for p in PROMPTS]
    assert len(ids[0]) != len(ids[1])  # the batch is padded
    out = llm.engine().generate(ids, max_new_tokens=32)  # no EOS ids: exactly 32 tokens
    for b, prompt in enumerate(ids):
        x = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32,
                                 do_sample=False)
        ref = ref[0, len(prompt):].tolist()
        assert len(ref) == 32 and 2 not in ref
        assert out.row(b) == ref, (llm.tokenizer.decode(out.row(b)), llm.tokenizer.decode(ref))


def test_answer_and_stream(llm):
    """Streams two rows (same batch and bucket as above: nothing recompiles) and stops at EOS."""
    pieces = {0: [], 1: []}
    q = "What is the capital of France?"
    c, other = llm.generate([q, PROMPTS[0]], max_new_tokens=24,
                            on_text=lambda row, text: pieces[row].append(text))
    assert "Paris" in c.text and c.finish_reason == "stop" and c.token_ids[-1] == 2
    assert "".join(pieces[0]) == c.text and len(pieces[0]) > 3
    assert "".join(pieces[1]) == other.text and other.finish_reason == "length"
    assert c.prompt_tokens == len(llm.encode(q))


def test_text_stream_multibyte(llm):
    tok = llm.tokenizer
    text = "Prix: 12 €, café crème, 東京タワー 🗼🇫🇷 naïve — done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # characters split over several tokens
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 10


def test_logits_call(llm):
    one = llm.encode("Hello there, general", chat=False)
    ids = np.asarray([one, one[::-1]])
    logits = llm(ids)
    assert logits.shape == (2, ids.shape[1], 49152) and logits.dtype == np.float32
    with pytest.raises(ValueError, match="integer token ids"):
        llm(np.zeros((2,), np.float32))
