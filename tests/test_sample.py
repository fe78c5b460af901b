import math

import mlx.core as mx
import numpy as np
import pytest

from llama2_mlx.errors import Llama2Error
from llama2_mlx.generation.sample import (
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
)

N = 20000  # draws per distribution (one batched call): frequency error ~0.004


def frequencies(sampler, probs, n=N, seed=0):
    """Empirical distribution of n draws from one row of probabilities."""
    logprobs = mx.log(mx.array(probs, dtype=mx.float32))
    mx.random.seed(seed)
    draws = np.array(sampler(mx.broadcast_to(logprobs, (n, len(probs)))))
    return np.bincount(draws, minlength=len(probs)) / n


def meta_sample_top_p_support(probs, p):
    """The distribution of Meta's ``sample_top_p`` (llama/generation.py), in numpy:
    sort descending, zero where cumsum - prob > p, renormalise."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, kind="stable")
    s = probs[order]
    s[np.cumsum(s) - s > p] = 0.0
    out = np.zeros_like(probs)
    out[order] = s / s.sum()
    return out


PROBS = [0.05, 0.5, 0.15, 0.3]  # deliberately not sorted


def test_greedy_at_temperature_zero():
    x = mx.array([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert make_sampler(0.0)(x).tolist() == [1, 0]
    # Filters are irrelevant when greedy.
    assert make_sampler(0.0, top_p=0.1, top_k=1, min_p=0.5)(x).tolist() == [1, 0]


@pytest.mark.parametrize("temp", [1.0, 0.5, 2.0])
def test_temperature(temp):
    p = np.array(PROBS) ** (1 / temp)
    np.testing.assert_allclose(frequencies(make_sampler(temp), PROBS), p / p.sum(), atol=0.02)


@pytest.mark.parametrize("top_p", [0.45, 0.6, 0.9, 0.99])
def test_top_p_has_metas_semantics(top_p):
    want = meta_sample_top_p_support(PROBS, top_p)
    got = frequencies(make_sampler(1.0, top_p=top_p), PROBS)
    np.testing.assert_allclose(got, want, atol=0.02)
    assert set(np.flatnonzero(got)) == set(np.flatnonzero(want))
    # The token that crosses p is kept: at 0.6 that is {0.5, 0.3}.
    if top_p == 0.6:
        np.testing.assert_allclose(want, [0, 0.5 / 0.8, 0, 0.3 / 0.8])


def test_top_p_is_taken_after_the_temperature():
    # p_max = 0.7 at T=1 (nucleus 0.6 -> one token); at T=3 it falls below 0.6.
    probs = [0.7, 0.2, 0.1]
    assert frequencies(make_sampler(1.0, top_p=0.6), probs, n=2000).tolist() == [1, 0, 0]
    tempered = np.array(probs) ** (1 / 3)
    want = meta_sample_top_p_support(tempered / tempered.sum(), 0.6)
    got = frequencies(make_sampler(3.0, top_p=0.6), probs)
    assert want[1] > 0 and want[2] == 0
    np.testing.assert_allclose(got, want, atol=0.02)


def test_top_k():
    got = frequencies(make_sampler(1.0, top_k=2), PROBS)
    np.testing.assert_allclose(got, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.02)
    # top_k >= vocab is no filter.
    np.testing.assert_allclose(frequencies(make_sampler(1.0, top_k=10), PROBS), PROBS, atol=0.02)


def test_min_p():
    # Threshold 0.25 * 0.5 = 0.125: drops 0.05 only.
    got = frequencies(make_sampler(1.0, min_p=0.25), PROBS)
    np.testing.assert_allclose(got, [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], atol=0.02)


def test_filters_compose_top_k_then_top_p_then_min_p():
    probs = [0.4, 0.3, 0.2, 0.1]
    # top_k=3 renormalises to 4/9, 3/9, 2/9; the nucleus 0.5 keeps 4/9 and 3/9.
    got = frequencies(make_sampler(1.0, top_p=0.5, top_k=3), probs)
    np.testing.assert_allclose(got, [4 / 7, 3 / 7, 0, 0], atol=0.02)
    got = frequencies(make_sampler(1.0, top_p=0.95, min_p=0.6), probs)
    np.testing.assert_allclose(got, [4 / 7, 3 / 7, 0, 0], atol=0.02)


def test_sampler_accepts_logits_and_batches_rows():
    logits = mx.array([[0.0, 10.0, -5.0, 0.0], [9.0, 0.0, 0.0, 0.0]]) + 3.0  # unnormalised
    mx.random.seed(1)
    for s in (make_sampler(0.5), make_sampler(0.5, top_p=0.9, top_k=3, min_p=0.01)):
        out = s(logits)
        assert out.shape == (2,) and out.tolist() == [1, 0]


def test_seed_reproducibility():
    x = mx.zeros((64, 100))
    for s in (make_sampler(1.0), make_sampler(0.8, top_p=0.9, top_k=50)):
        mx.random.seed(7)
        a = s(x).tolist()
        mx.random.seed(7)
        b = s(x).tolist()
        mx.random.seed(8)
        c = s(x).tolist()
        assert a == b and a != c


def test_repetition_penalty():
    logits = mx.array([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    rp = make_repetition_penalty(2.0, context_size=20)
    # The same (T,) history for every row; repeats are harmless.
    out = rp(mx.array([0, 1, 0]), logits)
    np.testing.assert_allclose(np.array(out), [[1.0, -2.0, 0.5, 3.0]] * 2)
    # A (B, T) history per row.
    out = rp(mx.array([[3, 3], [2, 1]]), logits)
    np.testing.assert_allclose(np.array(out), [[2.0, -1.0, 0.5, 1.5], [2.0, -2.0, 0.25, 3.0]])
    # Only the last context_size tokens count.
    out = make_repetition_penalty(2.0, context_size=1)(mx.array([0, 3]), logits[:1])
    np.testing.assert_allclose(np.array(out), [[2.0, -1.0, 0.5, 1.5]])
    assert rp(mx.array([], dtype=mx.int32), logits) is logits


def test_make_logits_processors():
    assert make_logits_processors() == [] and make_logits_processors(1.0) == []
    (p,) = make_logits_processors(1.5, context_size=4)
    out = p(mx.array([0]), mx.array([[3.0, 1.0]]))
    assert math.isclose(out[0, 0].item(), 2.0)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(temp=-1), "temp must be >= 0"),
        (dict(temp=1, top_p=0.0), "top_p"),
        (dict(temp=1, top_p=1.5), "top_p"),
        (dict(temp=1, top_k=-2), "top_k"),
        (dict(temp=1, min_p=2.0), "min_p"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, msg):
    with pytest.raises(Llama2Error, match=msg):
        make_sampler(**kwargs)


def test_bad_penalty():
    with pytest.raises(Llama2Error, match="repetition_penalty must be > 0"):
        make_logits_processors(0.0)
