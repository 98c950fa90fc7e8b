"""Prompt-lookup drafting: guess the next tokens by finding the text's last few tokens earlier in it.

Answers that copy spans of their input (a summary quoting its document, extracted fields, an edited paragraph)
repeat runs of the prompt. When the last n tokens (n from `max_ngram` down to `min_ngram`) occurred before, the
tokens that followed their latest earlier occurrence are the draft; the model verifies them all in one forward
pass (edge/generate.py). No draft model, nothing to load.

How many of them to draft is chosen for speed, not by a fixed rule: a pass of m rows costs `PassCosts.of(m)`
seconds on this CPU (measured: int4 kernels work in tiles, so 4 rows may cost 1.2 times one row and 5 rows 1.6
times), and a draft of k tokens is expected to yield 1 + a + a^2 + ... + a^k tokens, where a is the running rate at
which drafts found by an n-gram of that length were accepted. The draft size with the most tokens per second wins;
where none beats plain decoding nothing is drafted, and after `probe_after` such steps one token is drafted to see
whether the text has started to repeat.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class DraftSettings:
    max_draft: int = 8  # most tokens drafted for one verification pass
    max_ngram: int = 4  # longest run of last tokens looked up
    min_ngram: int = 2  # shortest: a single token matches too often to be worth a pass
    prior: float = 0.5  # acceptance rate assumed before any draft of an n-gram length was verified
    memory: float = 0.9  # weight of the past in the running acceptance rates (about the last 10 drafts)
    probe_after: int = 16  # steps without a worthwhile draft before one token is drafted anyway


class PassCosts:
    """Seconds a forward pass of m rows takes on this decoder and CPU: calibrated once, kept up to date by every
    verification pass."""

    def __init__(self):
        self.seconds: dict[int, float] = {}
        self.calibrated = False

    def observe(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def of(self, rows: int) -> float:
        """The measured cost, or one read off the nearest measured sizes (1.1x per extra row beyond them)."""
        if rows in self.seconds:
            return self.seconds[rows]
        if not self.seconds:
            return 1.0 + 0.1 * (rows - 1)
        below = [m for m in self.seconds if m < rows]
        above = [m for m in self.seconds if m > rows]
        if below and above:
            lo, hi = max(below), min(above)
            return self.seconds[lo] + (self.seconds[hi] - self.seconds[lo]) * (rows - lo) / (hi - lo)
        near = max(below) if below else min(above)
        return self.seconds[near] * (1.0 + 0.1 * (rows - near))


class PromptLookup:
    def __init__(self, settings: DraftSettings | None = None, costs: PassCosts | None = None):
        self.settings = settings or DraftSettings()
        self.costs = costs or PassCosts()
        s = self.settings
        # running counts per n-gram length: accepted drafted tokens, and tokens tried (accepted or the first miss)
        self.hits = {n: 2 * s.prior for n in range(s.min_ngram, s.max_ngram + 1)}
        self.trials = {n: 2.0 for n in self.hits}
        self.idle = 0  # steps in a row with a match but no worthwhile draft
        self.latest: dict[int, dict[tuple, int]] = {n: {} for n in self.hits}  # n-gram -> where what followed starts
        self.indexed = 0  # history tokens indexed
        self.last_n = 0  # the n-gram length of the last draft

    def lookup(self, history: Sequence[int], count: int) -> tuple[list[int], int]:
        """Up to count tokens that followed the latest earlier occurrence of the history's last n-gram, and n."""
        self._index(history)
        for n in range(self.settings.max_ngram, self.settings.min_ngram - 1, -1):
            if len(history) <= n:
                continue
            start = self.latest[n].get(tuple(history[-n:]))
            if start is not None:
                return list(history[start:start + count]), n
        return [], 0

    def _index(self, history: Sequence[int]) -> None:
        """Note, for each n, where the text after every n-gram but the last starts (the latest occurrence wins):
        one dictionary update per new token and n, instead of a scan of the whole text per step."""
        if len(history) < self.indexed:  # another text: start over
            self.latest, self.indexed = {n: {} for n in self.latest}, 0
        for end in range(max(self.indexed, 1), len(history)):  # an n-gram ending before `end` is followed by it
            for n, table in self.latest.items():
                if end >= n:
                    table[tuple(history[end - n:end])] = end
        self.indexed = max(len(history), self.indexed)

    def draft(self, history: Sequence[int], room: int) -> list[int]:
        """The lookup's tokens, as many as are expected to decode fastest (none where plain decoding is)."""
        found, n = self.lookup(history, min(self.settings.max_draft, room))
        if not found:
            return []
        size = self.best_size(self.hits[n] / self.trials[n], len(found))
        if size == 0:
            self.idle += 1
            if self.idle < self.settings.probe_after:
                return []
            size = 1
        self.idle, self.last_n = 0, n
        return found[:size]

    def best_size(self, rate: float, most: int) -> int:
        """The draft size with the most expected tokens per second of the pass that verifies it."""
        best, best_speed, expected = 0, 1.0 / self.costs.of(1), 1.0
        for k in range(1, most + 1):
            expected += rate ** k
            speed = expected / self.costs.of(k + 1)
            if speed > best_speed:
                best, best_speed = k, speed
        return best

    def update(self, drafted: int, accepted: int) -> None:
        """Count how the last draft fared: each drafted token is accepted with the running rate, given the ones
        before it were."""
        if not drafted:
            return
        n, keep = self.last_n, self.settings.memory
        self.hits[n] = keep * self.hits[n] + accepted
        self.trials[n] = keep * self.trials[n] + accepted + (accepted < drafted)
