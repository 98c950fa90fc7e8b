"""How much a model loses against a reference on the same text, teacher-forced: perplexity, the perplexity ratio,
top-1 agreement and mean KL(reference || model), as `llama-perplexity --kl-divergence` reports them.

Rows arrive a few at a time (a vocabulary-wide row per token is 200 KB for a 49k vocabulary), so the figures are
accumulated and no text-long array of log-probabilities is ever held. The exporter's check and `edge eval` both
use this code.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from edge.sampling import log_softmax


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """The text cut into consecutive windows of at most `size` tokens, each scored from a fresh context (the
    first token of each window is context only). A last window shorter than 2 tokens predicts nothing: dropped."""
    if size < 2:
        raise ValueError(f"a scoring window needs at least 2 tokens, not {size}")
    cut = [list(ids[i:i + size]) for i in range(0, len(ids), size)]
    return [w for w in cut if len(w) >= 2]


def scored_rows(forward, ids: Sequence[int], last_only: bool, split: int = 1):
    """(logits, targets) blocks predicting ids[split:] (rows for positions split-1 .. n-2), teacher-forced
    through a fresh KV cache: forward(int64 tokens) runs the next chunk and returns its logits rows. ids[:split]
    go in one pass, then the rest in one pass, or a token at a time where the graph returns only the last
    position (the fast graph)."""
    first = forward(np.array(ids[:split], np.int64))[-1:]
    yield first, list(ids[split:split + 1])
    if not last_only:
        if len(ids) - 1 > split:
            yield forward(np.array(ids[split:-1], np.int64)), list(ids[split + 1:])
        return
    for i in range(split, len(ids) - 1):
        yield forward(np.array([ids[i]], np.int64)), list(ids[i + 1:i + 2])


class Figures:
    """Running sums over scored positions; `add` a block of rows, `result()` the figures so far."""

    def __init__(self):
        self.tokens = 0
        self.nll = 0.0  # summed -log p(target) under the model
        self.nll_reference = 0.0
        self.kl = 0.0
        self.agree = 0
        self.compared = False

    def add(self, logits: np.ndarray, targets: Sequence[int], reference: np.ndarray | None = None) -> None:
        """logits: [rows, vocab] predicting targets (one per row); reference: the same rows of the reference."""
        got = log_softmax(np.asarray(logits, np.float64))  # float64: sums over thousands of rows
        rows = np.arange(len(targets))
        self.tokens += len(targets)
        self.nll -= float(got[rows, targets].sum())
        if reference is None:
            return
        if reference.shape != got.shape:
            raise ValueError(f"the reference's logits are {reference.shape[1:]} wide, the model's {got.shape[1:]}: "
                             f"compare bundles of the same model")
        ref = log_softmax(np.asarray(reference, np.float64))
        self.compared = True
        self.nll_reference -= float(ref[rows, targets].sum())
        self.kl += float((np.exp(ref) * (ref - got)).sum())
        self.agree += int((ref.argmax(-1) == got.argmax(-1)).sum())

    def result(self) -> dict:
        if not self.tokens:
            raise ValueError("no token was scored: the text needs at least 2 tokens")
        out = {"text_tokens": self.tokens, "perplexity": float(np.exp(self.nll / self.tokens))}
        if self.compared:
            reference = float(np.exp(self.nll_reference / self.tokens))
            out.update(perplexity_reference=reference, perplexity_ratio=out["perplexity"] / reference,
                       top1_agreement=self.agree / self.tokens, mean_kl=self.kl / self.tokens)
        return out


def measure(blocks: Iterable[tuple[np.ndarray, Sequence[int]]],
            reference: Iterator[tuple[np.ndarray, Sequence[int]]] | None = None) -> dict:
    """Figures over (logits, targets) blocks; with a reference, its blocks must cover the same targets."""
    figures = Figures()
    for logits, targets in blocks:
        ref = None
        if reference is not None:
            ref, ref_targets = next(reference)
            if list(ref_targets) != list(targets):
                raise ValueError("the reference was fed other tokens: give both the same text and tokenizer")
        figures.add(logits, targets, ref)
    return figures.result()
