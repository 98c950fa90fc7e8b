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
    """Seconds a forward pass of m rows takes on this decoder and CPU: a one-row pass's seconds now, times the
    m-row pass's ratio to it.

    The two are kept apart because they drift differently. The ratios belong to the kernels (how many rows a tile
    holds, whether extra rows are compute-bound): calibrated once, refined by every pass of that size. The one-row
    time belongs to the moment (a thermal throttle, a neighbour's load) and every pass of any size moves it, so
    sizes the drafter has stopped choosing keep their proportion to the others instead of a stale figure: a board
    that slowed down after calibration would otherwise see long drafts as cheap. One stalled pass moves either by
    a bounded step only (`jump`)."""

    def __init__(self, keep: float = 0.8, jump: float = 1.5):
        self.base: float | None = None  # seconds of a one-row pass, now
        self.ratios: dict[int, float] = {1: 1.0}  # rows -> seconds of such a pass / one row's
        self.keep = keep  # weight of the past in each update (about the last 5 passes)
        self.jump = jump  # one pass moves an estimate towards at most jump times (or 1/jump of) its value
        self.calibrated = False

    def set_from(self, seconds: dict[int, float]) -> PassCosts:
        """Start over from one timing per row count (calibration; one row's must be among them)."""
        self.base = seconds[1]
        self.ratios = {rows: s / seconds[1] for rows, s in seconds.items()}
        self.calibrated = True
        return self

    def observe(self, rows: int, seconds: float) -> None:
        ratio = self.ratio(rows)
        if self.base is None:
            self.base = seconds / ratio
            return
        self.base = self._toward(self.base, seconds / ratio)
        if rows != 1:
            self.ratios[rows] = self._toward(ratio, seconds / self.base)

    def _toward(self, old: float, new: float) -> float:
        return self.keep * old + (1 - self.keep) * min(max(new, old / self.jump), old * self.jump)

    def of(self, rows: int) -> float:
        return (self.base or 1.0) * self.ratio(rows)

    def ratio(self, rows: int) -> float:
        """The measured ratio, or one read off the nearest measured sizes (10% more per row beyond them)."""
        r = self.ratios
        if rows in r:
            return r[rows]
        below = [m for m in r if m < rows]
        above = [m for m in r if m > rows]
        if below and above:
            lo, hi = max(below), min(above)
            return r[lo] + (r[hi] - r[lo]) * (rows - lo) / (hi - lo)
        near = max(below) if below else min(above)
        return r[near] * (1.0 + 0.1 * (rows - near))


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
