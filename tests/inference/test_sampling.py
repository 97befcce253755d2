"""Sampling: greedy == argmax, top-k / top-p only pick allowed tokens, seeds reproduce, bad values
raise one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.inference.sampling import SamplingConfig, SamplingError, sample

V = 50


def _logits(seed, b=4):
    return jax.random.normal(jax.random.key(seed), (b, V)) * 3.0


def _draw(logits, cfg: SamplingConfig, n: int, seed: int = 0) -> np.ndarray:
    """n independent draws per row: [n B]."""
    greedy, top_k, use_top_p = cfg.static(V)
    temperature, top_p = cfg.dynamic()
    fn = jax.jit(jax.vmap(lambda k: sample(logits, k, temperature, top_p, greedy=greedy,
                                           top_k=top_k, use_top_p=use_top_p)))
    return np.asarray(fn(jax.random.split(jax.random.key(seed), n)))


def test_temperature_zero_is_argmax():
    logits = _logits(0)
    got = _draw(logits, SamplingConfig(temperature=0.0, top_k=3, top_p=0.5), 3)
    np.testing.assert_array_equal(got, np.broadcast_to(np.argmax(logits, -1), got.shape))


def test_top_k_only_picks_the_k_largest():
    logits = _logits(1)
    got = _draw(logits, SamplingConfig(temperature=1.5, top_k=5), 400)
    allowed = np.argsort(-np.asarray(logits), -1)[:, :5]
    for b in range(logits.shape[0]):
        assert set(got[:, b]) <= set(allowed[b])
        assert len(set(got[:, b])) >= 3  # it does sample, not always the argmax


def _nucleus(row: np.ndarray, top_p: float) -> set:
    p = np.exp(row - row.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    return set(order[before < top_p].tolist())


def test_top_p_only_picks_the_nucleus():
    logits = _logits(2)
    got = _draw(logits, SamplingConfig(temperature=1.0, top_p=0.6), 400)
    for b in range(logits.shape[0]):
        allowed = _nucleus(np.asarray(logits[b]), 0.6)
        assert 1 < len(allowed) < V
        assert set(got[:, b]) <= allowed
        assert len(set(got[:, b])) > 1


def test_top_k_then_top_p():
    """top-k first, then the nucleus of the renormalized k: every kept token is drawn about as
    often as its renormalized probability, and nothing outside the kept set is ever drawn (so a
    sampler that returns the argmax, or that skips either filter, fails)."""
    temperature, n = 2.5, 2000
    logits = _logits(3)
    got = _draw(logits, SamplingConfig(temperature=temperature, top_k=8, top_p=0.7), n)
    for b in range(logits.shape[0]):
        row = np.asarray(logits[b], np.float64) / temperature
        top8 = np.argsort(-row)[:8]
        masked = np.full(V, -np.inf)
        masked[top8] = row[top8]
        kept = sorted(_nucleus(masked, 0.7))
        # both filters bite on these logits: top-p keeps fewer than the 8, and without top-k
        # first the nucleus of the whole row would be larger
        assert 1 < len(kept) < 8 and len(_nucleus(row, 0.7)) > len(kept)
        p = np.exp(row[kept] - row[kept].max())
        p /= p.sum()
        freq = np.bincount(got[:, b], minlength=V) / n
        assert freq[np.setdiff1d(np.arange(V), kept)].sum() == 0  # never outside the kept set
        # each kept token's frequency within 4.5 binomial standard deviations of its probability
        bound = 4.5 * np.sqrt(p * (1 - p) / n) + 1 / n
        assert (np.abs(freq[kept] - p) <= bound).all(), (b, kept, freq[kept], p)


def test_temperature_sharpens():
    logits = _logits(4, b=1)
    hot = _draw(logits, SamplingConfig(temperature=5.0), 500)
    cold = _draw(logits, SamplingConfig(temperature=0.2), 500)
    best = int(np.argmax(logits[0]))
    assert (cold == best).mean() > (hot == best).mean() + 0.3


def test_seed_reproducible_and_rows_independent():
    logits = jnp.broadcast_to(_logits(5, b=1), (6, V))
    cfg = SamplingConfig(temperature=1.0)
    a, b, c = _draw(logits, cfg, 20, seed=7), _draw(logits, cfg, 20, seed=7), _draw(logits, cfg,
                                                                                     20, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a != a[:, :1]).any()  # identical rows still draw different tokens


@pytest.mark.parametrize("kw, word", [({"temperature": -1.0}, "temperature"),
                                      ({"temperature": float("nan")}, "temperature"),
                                      ({"top_p": 2.0}, "top_p"), ({"top_p": 0.0}, "top_p"),
                                      ({"top_k": -3}, "top_k")])
def test_bad_values_raise(kw, word):
    with pytest.raises(SamplingError, match=word) as e:
        SamplingConfig(**kw)
    assert "\n" not in str(e.value)
