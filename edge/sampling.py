"""Samplers and logits processors, built once from parameters; pure numpy functions on a logits vector.

The order is transformers': repetition penalty, then temperature, top_k, top_p, min_p, then a draw.
`temperature == 0` means argmax (after the repetition penalty, as transformers' greedy search does).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Sampler = Callable[[np.ndarray], int]
Processor = Callable[[Sequence[int], np.ndarray], np.ndarray]


def logprob(logits: np.ndarray, token: int) -> float:
    """log_softmax(logits)[token] in one pass over the vocabulary, without the full array."""
    top = logits.max()
    return float(logits[token] - top - np.log(np.exp(logits - top).sum()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def make_processors(repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    prompt_length: int = 0) -> list[Processor]:
    processors = [repetition_penalty_processor(repetition_penalty)] if repetition_penalty != 1.0 else []
    if presence_penalty or frequency_penalty:
        processors.append(openai_penalty_processor(presence_penalty, frequency_penalty, prompt_length))
    return processors


def openai_penalty_processor(presence: float, frequency: float, prompt_length: int) -> Processor:
    """OpenAI's rule over the tokens generated so far: logit -= count * frequency + (count > 0) * presence."""
    def apply(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        generated = np.asarray(tokens[prompt_length:])
        if not len(generated):
            return logits
        ids, counts = np.unique(generated, return_counts=True)
        logits = logits.copy()
        logits[ids] -= counts * frequency + presence
        return logits
    return apply


def repetition_penalty_processor(penalty: float) -> Processor:
    def apply(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        if not len(tokens):
            return logits
        seen = np.unique(np.asarray(tokens))
        score = logits[seen]
        logits = logits.copy()
        logits[seen] = np.where(score < 0, score * penalty, score / penalty)
        return logits
    return apply


def make_warper(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Temperature, then top_k, top_p and min_p filters: logits in, float64 logits out (-inf where removed)."""
    filters = [f for f in (_top_k(top_k), _top_p(top_p), _min_p(min_p)) if f is not None]

    def warp(logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float64) / temperature
        for f in filters:
            logits = f(logits)
        return logits
    return warp


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    if temperature == 0:
        return lambda logits: int(np.argmax(logits))
    warp = make_warper(temperature, top_k, top_p, min_p)
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        logits = warp(logits)
        return draw(np.exp(logits - logits.max()), rng)
    return sample


def make_distribution(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """The distribution make_sampler draws from, as probabilities (float64, summing to 1): what speculative
    decoding accepts a drafted token by. Temperature 0 puts all the mass on the argmax."""
    if temperature == 0:
        def greedy(logits: np.ndarray) -> np.ndarray:
            probs = np.zeros(len(logits))
            probs[int(np.argmax(logits))] = 1.0
            return probs
        return greedy
    warp = make_warper(temperature, top_k, top_p, min_p)

    def distribution(logits: np.ndarray) -> np.ndarray:
        logits = warp(logits)
        probs = np.exp(logits - logits.max())
        return probs / probs.sum()
    return distribution


def draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn with probability proportional to its weight."""
    cdf = np.cumsum(weights)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def _top_k(k: int):
    if k <= 0:
        return None

    def apply(logits: np.ndarray) -> np.ndarray:
        if k >= len(logits):
            return logits
        kth = np.partition(logits, -k)[-k]
        return np.where(logits < kth, -np.inf, logits)  # ties with the k-th survive, as in transformers
    return apply


def _top_p(p: float):
    if p >= 1.0:
        return None

    def apply(logits: np.ndarray) -> np.ndarray:
        # transformers sorts the whole vocabulary; the nucleus only needs the top tokens, so sort a partial
        # selection and widen it until it holds the nucleus (exact: the result is the same set).
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        width = min(256, len(logits))
        while True:
            top = np.argpartition(-probs, width - 1)[:width] if width < len(logits) else np.arange(len(logits))
            top = top[np.argsort(probs[top], kind="stable")[::-1]]  # descending
            cumulative = np.cumsum(probs[top])
            if cumulative[-1] > p or width == len(logits):
                break
            width = min(width * 4, len(logits))
        # Keep the tokens transformers keeps: those whose ascending cumulative mass exceeds 1 - p, i.e. the
        # descending prefix up to and including the first token that brings the mass to at least p.
        keep = top[: int(np.searchsorted(cumulative, p, side="left")) + 1]
        out = np.full_like(logits, -np.inf)
        out[keep] = logits[keep]
        return out
    return apply


def _min_p(p: float):
    if p <= 0.0:
        return None

    def apply(logits: np.ndarray) -> np.ndarray:
        probs = np.exp(logits - logits.max())  # relative to the top token, so no normalisation needed
        return np.where(probs < p, -np.inf, logits)
    return apply
