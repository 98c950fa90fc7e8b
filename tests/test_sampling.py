"""Samplers against transformers' own logits processors, and seeded determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from edge.sampling import log_softmax, make_processors, make_sampler, make_warper

CASES = [
    dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=1.3, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0),
    dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.1),
    dict(temperature=0.6, top_k=20, top_p=0.9, min_p=0.05),
]


def transformers_warp(logits: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
    scores = torch.tensor(logits[None], dtype=torch.float64)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p else []
    for w in warpers:
        scores = w(None, scores)
    return scores[0].numpy()


@pytest.mark.parametrize("params", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_warper_matches_transformers(params, seed):
    logits = np.random.default_rng(seed).normal(0, 3, size=1000).astype(np.float32)
    ours, theirs = make_warper(**params)(logits), transformers_warp(logits, **params)
    assert np.array_equal(np.isinf(ours), np.isinf(theirs))
    kept = ~np.isinf(ours)
    assert np.allclose(ours[kept], theirs[kept], atol=1e-6)
    assert 0 < kept.sum() <= 1000


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(penalty):
    logits = np.random.default_rng(2).normal(0, 3, size=100).astype(np.float32)
    history = [3, 7, 7, 50, 99]
    (ours,) = [p(history, logits) for p in make_processors(penalty)]
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), torch.tensor(logits[None]))[0].numpy()
    assert np.allclose(ours, theirs)


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(3).normal(size=50)
    assert make_sampler(temperature=0)(logits) == int(np.argmax(logits))
    assert make_processors(1.0) == []


def test_seed_fixes_the_draws():
    logits = np.random.default_rng(4).normal(0, 1, size=200)

    def draws(seed):
        sampler = make_sampler(1.0, seed=seed)
        return [sampler(logits) for _ in range(30)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_draws_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    sampler = make_sampler(1.0, seed=0)
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_top_k_one_always_picks_the_top():
    logits = np.random.default_rng(5).normal(size=100)
    sampler = make_sampler(2.0, top_k=1, seed=0)
    assert {sampler(logits) for _ in range(50)} == {int(np.argmax(logits))}


def test_log_softmax_normalises():
    lp = log_softmax(np.random.default_rng(6).normal(size=30))
    assert np.isclose(np.exp(lp).sum(), 1.0)


@pytest.mark.parametrize("scale, top_p", [(0.3, 0.9), (3.0, 0.5), (8.0, 0.999)])
def test_top_p_partial_selection_is_exact_on_a_large_vocabulary(scale, top_p):
    # flat logits put thousands of tokens in the nucleus, which makes the partial selection widen
    logits = np.random.default_rng(9).normal(0, scale, size=150_000).astype(np.float32)
    ours = make_warper(temperature=1.0, top_p=top_p)(logits)
    theirs = transformers_warp(logits, 1.0, 0, top_p, 0.0)
    assert np.array_equal(np.isinf(ours), np.isinf(theirs))


def test_logprob_matches_log_softmax():
    from edge.sampling import logprob

    logits = np.random.default_rng(10).normal(0, 4, size=5000)
    assert np.isclose(logprob(logits, 123), log_softmax(logits)[123])
