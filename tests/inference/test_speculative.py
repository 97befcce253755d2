"""Speculative decoding on tiny random models: greedy output equals plain greedy token for token
(n-gram and model drafts; dense and lambda layers; a padded batch), every registered kind's
cache rollback equals never having seen the rejected tokens, rejection sampling is exact in
distribution (a chi-square test), the n-gram lookup, and bad drafts fail in one line."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama import AttentionConfig, ModelConfig, RopeConfig, init_params
from jaxllama.config import (
    KIND_FIELDS,
    FoTConfig,
    LambdaConfig,
    Mamba2Config,
    MambaConfig,
    MLAConfig,
)
from jaxllama.inference.engine import Engine, GenerationError
from jaxllama.inference.sampling import SamplingConfig
from jaxllama.inference.speculative import (
    NO_TOKEN,
    DraftError,
    ModelDraft,
    NgramDraft,
    accept_sampled,
    check_rollback,
    ngram_propose,
)
from jaxllama.mixers import REGISTRY
from jaxllama.model import stack, unstack

V = 61
LAMBDA = LambdaConfig(global_tokens=2, window=8)
PATTERNS = {"dense": ("dense",) * 2, "lambda": ("lambda", "dense")}


def tiny(layers, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, layer_pattern=layers,
                       max_position_embeddings=128, tie_word_embeddings=True,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2,
                                                 rope=RopeConfig(theta=500.0)),
                       lambda_=LAMBDA if "lambda" in layers else None, **kw)


def random_params(cfg, seed=0):
    # sharp logits: greedy choices are not near-ties between the one- and many-token paths
    params = jax.jit(functools.partial(init_params, cfg))(jax.random.key(seed))
    return jax.tree.map(lambda a: a * 8 if a.ndim >= 2 else a, params)


def truncated(cfg, params, n):
    """The first n layers of the model, with its embedding and final norm: a draft that agrees
    with it often but not always."""
    small = cfg.replace(layer_pattern=cfg.layer_pattern[:n])
    rest = {k: v for k, v in params.items() if not k.startswith("run_")}
    return small, stack(small, unstack(cfg, params)[:n], rest)


# a prompt with repeats, so that the n-gram draft finds matches
PROMPTS = [[5, 9, 2, 7, 5, 9, 2, 7, 5, 9, 3], [11, 4, 4, 8, 11, 4]]
NEW = 20


@pytest.fixture(scope="module", params=sorted(PATTERNS))
def setup(request):
    cfg = tiny(PATTERNS[request.param])
    params = random_params(cfg)
    engine = Engine(cfg, params)
    plain = engine.generate(PROMPTS, NEW)
    return request.param, cfg, params, engine, plain


def test_greedy_ngram_draft_equals_plain_greedy(setup):
    _, _, _, engine, plain = setup
    out = engine.generate(PROMPTS, NEW, draft=NgramDraft(tokens=3, max_ngram=2))
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    np.testing.assert_array_equal(out.lengths, plain.lengths)
    assert out.draft_rounds < NEW  # some rounds kept more than one token


def test_greedy_model_draft_equals_plain_greedy(setup):
    _, cfg, params, engine, plain = setup
    draft = ModelDraft(*truncated(cfg, params, 1), tokens=4)
    out = engine.generate(PROMPTS, NEW, draft=draft)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    # partial acceptance exercises the rollback of both caches
    assert 0 < out.draft_accepted < out.draft_rounds * 4, (out.draft_accepted, out.draft_rounds)


def test_greedy_draft_streams_and_stops_at_eos(setup):
    """EOS inside a round stops the row there (pad after it), streamed tokens equal the
    result."""
    _, _, _, engine, plain = setup
    eos = int(plain.tokens[0, 5])
    ref = engine.generate(PROMPTS, NEW, eos_ids=[eos], pad_id=0)
    seen = []
    out = engine.generate(PROMPTS, NEW, eos_ids=[eos], pad_id=0, draft=NgramDraft(3, 2),
                          on_token=lambda i, t, a: seen.append(np.where(a, t, -1)))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.stopped, ref.stopped)
    streamed = np.stack(seen, axis=1)
    assert streamed.shape[1] == out.tokens.shape[1]
    for b in range(2):
        np.testing.assert_array_equal(streamed[b, :out.lengths[b]], out.row(b))


# The kinds whose spec has a rollback; the others are refused in one line (the test after this).
# Attention-family caches that roll back by length or slot must keep doing so.
WITH_ROLLBACK = sorted(k for k, s in REGISTRY.items() if s.rollback is not None)
WITHOUT_ROLLBACK = sorted(set(REGISTRY) - set(WITH_ROLLBACK))
# sub-configs (by ModelConfig field) of kinds beyond dense and lambda on the tiny model
SUB_CONFIGS = {"attention": {}, "lambda_": {},
               "mla": {"mla": MLAConfig(num_heads=4, num_kv_heads=2, q_lora_rank=16,
                                        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                        v_head_dim=6)},
               "fot": {"fot": FoTConfig(last_context_length=16)},
               "mamba": {"mamba": MambaConfig(state_size=4)},
               "mamba2": {"mamba2": Mamba2Config(head_dim=8, state_size=4)}}


def test_attention_kinds_keep_their_rollback():
    assert {"dense", "lambda", "mla"} <= set(WITH_ROLLBACK)


@pytest.mark.parametrize("kind", WITH_ROLLBACK)
def test_rollback_equals_never_appending(kind):
    """Every kind with a rollback: append 1 + 4 tokens, roll back to `keep`, append the next
    token == append the first `keep` tokens, then that token (outputs and the next call's
    output)."""
    spec = REGISTRY[kind]
    cfg = tiny((kind,), **SUB_CONFIGS[KIND_FIELDS[kind]])
    sub = spec.config(cfg)
    module = spec.module(cfg=sub)
    x = jax.random.normal(jax.random.key(0), (2, 14, 32))
    params = module.init(jax.random.key(1), x[:, :4], jnp.arange(4)[None])["params"]
    apply = jax.jit(lambda x, p, c: module.apply({"params": params}, x, p, c))
    pos = jnp.broadcast_to(jnp.arange(14), (2, 14))
    begin = jax.jit(lambda c: spec.rollback.begin(c, 5))
    end = jax.jit(spec.rollback.end)

    def feed(cache, lo, hi):  # one token per call: only the T = 1 and T = 5 shapes compile
        for i in range(lo, hi):
            y, cache = apply(x[:, i:i + 1], pos[:, i:i + 1], cache)
        return y, cache

    _, base = apply(x[:, :5], pos[:, :5], spec.cache.init(sub, 2, 32, jnp.float32))
    _, base = feed(base, 5, 8)  # 8 tokens in: the lambda ring (8) is full
    for keep in (1, 3):
        cache, saved = begin(base)
        _, cache = apply(x[:, 8:13], pos[:, 8:13], cache)
        cache = end(cache, saved, jnp.int32(keep))
        assert jax.tree.structure(cache) == jax.tree.structure(base)
        nxt = 8 + keep
        got, _ = feed(cache, nxt, nxt + 1)
        want, _ = feed(base, 8, nxt + 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", WITHOUT_ROLLBACK)
def test_a_kind_without_rollback_refuses_a_draft_in_one_line(kind):
    """A model using a kind that cannot undo tokens is refused before anything runs."""
    with pytest.raises(DraftError, match=rf"^speculative decoding: {kind} layers \(layer 1 of "
                                         r"the model\) cannot undo rejected tokens"):
        check_rollback(tiny(("dense", kind), **SUB_CONFIGS[KIND_FIELDS[kind]]))


def test_lambda_rollback_refuses_a_step_longer_than_the_window():
    cfg = tiny(("lambda",))
    engine = Engine(cfg, None)  # refused before anything reads the params
    with pytest.raises(GenerationError, match="window=8"):
        engine.generate([[1, 2, 3]], 4, draft=NgramDraft(tokens=8))


def test_ngram_propose_copies_after_the_latest_match():
    h = NO_TOKEN
    hist = jnp.asarray([[h, 1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3, h, h],
                        [h, h, 6, 6, 6, 6, 1, 8, 8, h, h, h, h, h]], jnp.int32)
    # row 0: last bigram (2, 3) at slots 10-11 last occurred at 6-7 -> 5, 7, then slot 10 = 2
    # row 1 (cur = 8): bigram (8, 8) unseen; unigram 8 at slot 7 -> 8 (slot 8), then unknown
    got = ngram_propose(hist, jnp.int32(11), 3, 2)
    np.testing.assert_array_equal(got[0], [5, 7, 2])
    got = ngram_propose(hist, jnp.int32(8), 3, 2)
    np.testing.assert_array_equal(got[1], [8, 8, 8])  # unknown entries: the pending token
    # no match at all: the pending token repeated
    got = ngram_propose(jnp.asarray([[h, 1, 2, 3, h]], jnp.int32), jnp.int32(3), 2, 2)
    np.testing.assert_array_equal(got, [[3, 3]])


def test_rejection_sampling_is_exact_in_distribution():
    """The first emitted token (position 0) and the second (given any first) of
    `accept_sampled`, over 20000 independent rows, against the model's own distribution p:
    chi-square statistics below the 0.999 quantile of their degrees of freedom (fixed seed; a
    wrong residual or acceptance rule moves the statistic by hundreds)."""
    v, k, n = 6, 2, 20000
    rng = np.random.RandomState(0)
    p_logits = jnp.asarray(rng.randn(1, k + 1, v) * 1.5, jnp.float32)
    q = jax.nn.softmax(jnp.asarray(rng.randn(1, k, v) * 1.5, jnp.float32), axis=-1)
    kd, ka = jax.random.split(jax.random.key(1))
    draft = jax.random.categorical(kd, jnp.log(jnp.broadcast_to(q, (n, k, v))), axis=-1)
    out, acc = accept_sampled(draft, jnp.broadcast_to(q, (n, k, v)),
                              jnp.broadcast_to(p_logits, (n, k + 1, v)), ka)
    p = np.asarray(jax.nn.softmax(p_logits[0], axis=-1), np.float64)
    out, acc = np.asarray(out), np.asarray(acc)
    # chi2 0.999 quantile, v - 1 = 5 degrees of freedom: 20.52
    first = np.bincount(out[:, 0], minlength=v)
    chi2 = np.sum((first - n * p[0]) ** 2 / (n * p[0]))
    assert chi2 < 20.52, (chi2, first / n, p[0])
    # the second token exists where the first was accepted; given that, it follows p[1]
    kept = acc >= 1
    second = np.bincount(out[kept, 1], minlength=v)
    m = kept.sum()
    chi2 = np.sum((second - m * p[1]) ** 2 / (m * p[1]))
    assert chi2 < 20.52, (chi2, second / m, p[1])
    # and the acceptance rate of the first draft is sum(min(p, q)), within 4 binomial sigmas
    rate = np.minimum(p[0], np.asarray(q[0, 0], np.float64)).sum()
    assert abs(kept.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)


def test_sampled_generation_with_a_draft_matches_plain_in_distribution():
    """End to end: temperature 1 with an n-gram draft vs plain sampling, the first generated
    token after a fixed prompt in 300 rows of one batch each (rows draw independently) of a
    1-layer model over 7 tokens, compared with a two-sample chi-square test (0.999 quantile of
    6 dof: 22.46)."""
    cfg = tiny(("dense",)).replace(vocab_size=7)
    engine = Engine(cfg, jax.tree.map(lambda a: a / 4, random_params(cfg)))
    cfg_s = SamplingConfig(temperature=1.0)
    prompts = [[1, 2, 3, 1, 2]] * 300
    draft = NgramDraft(tokens=2, max_ngram=2)
    counts = np.stack([
        np.bincount(engine.generate(prompts, 2, cfg_s, seed=1).tokens[:, 1], minlength=7),
        np.bincount(engine.generate(prompts, 2, cfg_s, seed=2, draft=draft).tokens[:, 1],
                    minlength=7)]).astype(float)
    tot = counts.sum(0)
    used = tot > 0
    exp = counts.sum(1, keepdims=True) * tot / tot.sum()
    chi2 = np.sum((counts[:, used] - exp[:, used]) ** 2 / exp[:, used])
    assert chi2 < 22.46, (chi2, counts)


def test_bad_drafts_fail_in_one_line():
    cfg = tiny(("dense",))
    engine = Engine(cfg, None)  # refused before anything reads the params
    other = tiny(("dense",)).replace(vocab_size=V + 1)
    with pytest.raises(DraftError, match="vocabulary"):
        engine.generate([[1, 2]], 3, draft=ModelDraft(other, None))
    with pytest.raises(DraftError, match="tokens"):
        NgramDraft(tokens=0)


def test_cli_draft_flags_give_plain_greedy_output(capsys, make_tiny_hf):
    """`--draft ngram` and `--draft CHECKPOINT` print the tokens of plain greedy decoding and
    the acceptance rate; an unreadable draft is one line on stderr and status 1."""
    from jaxllama.generate import main

    target = make_tiny_hf("spec_target", tie=True, kv_heads=2, context=64, seed=0)
    small = make_tiny_hf("spec_draft", tie=True, kv_heads=2, context=64, seed=1)
    common = ["--prompt", "one two one two one two", "--checkpoint", target, "--no-chat",
              "--json", "--max-new-tokens", "8", "--draft-tokens", "3"]
    rows = []
    for extra in ([], ["--draft", "ngram"], ["--draft", small]):
        assert main(common + extra) == 0
        out, err = capsys.readouterr()
        rows.append(json.loads(out)["token_ids"])
        assert ("draft acceptance" in err) == bool(extra), err
    assert rows[1] == rows[0] and rows[2] == rows[0]
    assert main(common + ["--draft", "/nonexistent/draft"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--draft /nonexistent/draft" in err[0], err
