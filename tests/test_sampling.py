import numpy as np
import pytest

from llmbook.sampling import Sampler

LOGITS = np.random.default_rng(0).normal(size=100) * 2


def test_temperature_zero_is_argmax():
    assert Sampler()(LOGITS) == int(np.argmax(LOGITS))


def test_same_seed_same_tokens():
    a, b = Sampler(0.9, top_p=0.9, seed=5), Sampler(0.9, top_p=0.9, seed=5)
    assert [a(LOGITS) for _ in range(50)] == [b(LOGITS) for _ in range(50)]


def test_different_seeds_differ():
    a, b = Sampler(1.0, seed=1), Sampler(1.0, seed=2)
    assert [a(LOGITS) for _ in range(50)] != [b(LOGITS) for _ in range(50)]


def test_top_k_keeps_only_k_tokens():
    s = Sampler(2.0, top_k=3, seed=0)
    allowed = set(np.argsort(-LOGITS)[:3])
    assert {s(LOGITS) for _ in range(500)} == allowed


def test_top_p_keeps_the_nucleus():
    s = Sampler(1.0, top_p=0.5, seed=0)
    p = Sampler(1.0).probabilities(LOGITS)
    order = np.argsort(-p)
    nucleus = set(order[: np.searchsorted(np.cumsum(p[order]), 0.5) + 1])
    assert {s(LOGITS) for _ in range(2000)} == nucleus
    kept = s.probabilities(LOGITS)
    assert abs(kept.sum() - 1) < 1e-12 and set(np.flatnonzero(kept)) == nucleus


def test_frequencies_follow_softmax():
    logits = np.array([1.0, 2.0, 0.5, -1.0])
    s = Sampler(0.7, seed=3)
    freq = np.bincount([s(logits) for _ in range(40000)], minlength=4) / 40000
    want = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    assert np.abs(freq - want).max() < 0.01


def test_low_temperature_approaches_greedy():
    s = Sampler(1e-3, seed=0)
    assert all(s(LOGITS) == np.argmax(LOGITS) for _ in range(100))


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)
