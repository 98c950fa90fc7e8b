"""Prompt-lookup drafting: guess the next tokens by finding the text's last few tokens earlier in it.

Answers that copy spans of their input (a summary quoting its document, extracted fields, an edited paragraph)
repeat runs of the prompt. When the last n tokens (n from `max_ngram` down to `min_ngram`) occurred before, the
tokens that followed their latest earlier occurrence are the draft; the model verifies them all in one forward
pass (edge/generate.py). No draft model, nothing to load.

How many tokens to draft adapts to what was accepted, so that open-ended text, where matches are chance, costs
little: a draft accepted whole doubles the next one (up to `max_draft`), a partly accepted one sets it to what
was accepted plus one, and drafts rejected `patience` times in a row pause drafting for `cooldown` steps.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass
class DraftSettings:
    max_draft: int = 8  # most tokens drafted for one verification pass
    max_ngram: int = 3  # longest run of last tokens looked up
    min_ngram: int = 2  # shortest: a single token matches too often to be worth a pass
    patience: int = 2  # drafts rejected outright in a row before drafting pauses
    cooldown: int = 8  # steps without drafting after that


class PromptLookup:
    def __init__(self, settings: DraftSettings | None = None):
        self.settings = settings or DraftSettings()
        self.size = max(1, self.settings.max_draft // 2)  # tokens to draft next time
        self.misses = 0  # drafts rejected outright in a row
        self.paused = 0  # steps left without drafting

    def draft(self, history: Sequence[int], room: int) -> list[int]:
        """Up to min(size, room) tokens that followed the latest earlier occurrence of the history's last n-gram."""
        if self.paused:
            self.paused -= 1
            return []
        count = min(self.size, room)
        if count <= 0:
            return []
        tokens = np.asarray(history)
        s = self.settings
        for n in range(s.max_ngram, s.min_ngram - 1, -1):
            if len(tokens) <= n:
                continue
            # windows over all but the last token: every match has at least one token after it
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return tokens[start:start + count].tolist()
        return []

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt to how a draft fared."""
        if not drafted:
            return
        s = self.settings
        if accepted == drafted:
            self.size, self.misses = min(2 * drafted, s.max_draft), 0
        elif accepted:
            self.size, self.misses = accepted + 1, 0
        else:
            self.size, self.misses = 1, self.misses + 1
            if self.misses >= s.patience:
                self.paused, self.misses = s.cooldown, 0
