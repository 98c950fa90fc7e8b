"""The generation loop as layered generators.

`step` yields (token, logprob, ...) tuples: prefill, then one decode step per token, through a decoder adapter
(edge/decoder.py) and a KV state it is given (edge/cache.py). `stream` turns them into
`Record`s of text, honouring eos ids, stop strings and max_tokens. `generate` joins a stream into a string.
The CLI, the HTTP server and embedding products consume `stream` and nothing below it.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np

from edge import sampling
from edge.cache import KVState, common_prefix
from edge.decoder import Decoder
from edge.sampling import Processor, Sampler, log_softmax, make_processors, make_sampler
from edge.tokenizer import Tokenizer


class ContextError(ValueError):
    """The model cannot take this prompt: it is empty, has ids outside the vocabulary, or does not fit."""


class ContextLengthError(ContextError):
    """The prompt leaves no room in the context (OpenAI's "context_length_exceeded")."""


@dataclass
class GenerationParams:
    max_tokens: int = 256  # most tokens to generate; fewer if the context fills first
    temperature: float = 0.8  # 0 means greedy (argmax)
    top_k: int = 40  # keep the k most likely tokens; 0 turns it off
    top_p: float = 0.95  # keep the smallest set of tokens whose probability reaches p; 1 turns it off
    min_p: float = 0.05  # drop tokens below min_p times the top token's probability; 0 turns it off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (transformers' rule)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from tokens already generated (-2 to 2)
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens (-2 to 2)
    top_logprobs: int = 0  # also report this many most likely tokens at each step (0 to 20)
    seed: int | None = None  # fixes the random draws; None draws a fresh seed
    stop: list[str] = field(default_factory=list)  # strings that end generation; not included in the text
    ignore_eos: bool = False  # generate past end-of-sequence tokens, up to max_tokens (benchmarks, as llama.cpp's)

    def __post_init__(self):
        checks = {
            "max_tokens": self.max_tokens >= 0, "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0, "top_p": 0 < self.top_p <= 1, "min_p": 0 <= self.min_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "presence_penalty": -2 <= self.presence_penalty <= 2, "frequency_penalty": -2 <= self.frequency_penalty <= 2,
            "top_logprobs": 0 <= self.top_logprobs <= 20,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"out of range: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @classmethod
    def with_defaults(cls, defaults: dict, **overrides) -> GenerationParams:
        """The bundle's defaults, then the caller's values (None means 'not given')."""
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
        merged = {k: v for k, v in defaults.items() if k in names}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**merged)


class Record(NamedTuple):
    text: str  # new text; "" while a character or a possible stop string is incomplete
    token: int  # the token id sampled at this step
    logprob: float  # its log-probability under the model's raw distribution (log-softmax of the logits)
    finish_reason: str | None  # None, "stop" (eos or stop string) or "length"
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token, logprob) of the most likely tokens, when asked
    piece: str = ""  # the token's own text as it reads mid-sentence, special tokens included (for logprobs)
    top_pieces: tuple[str, ...] = ()  # the texts of the top_logprobs tokens, in their order
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not prefilled
    seconds: float = 0.0  # from the start of the stream to this record
    compute_seconds: float = 0.0  # of which spent in the decoder for this record (the first: the prefill too)


def step(decoder: Decoder, state: KVState, prompt: Sequence[int], sampler: Sampler, processors: list[Processor],
         top_n: int = 0) -> Iterator[tuple[int, float, tuple, float]]:
    """Prefill what the state lacks of the prompt, then yield (token, logprob, top_n alternatives, seconds in the
    decoder) forever; the consumer decides when to stop. The state must hold a prefix of the prompt, shorter than
    it, and is left holding the prompt and every yielded token but the last."""
    if state.offset >= len(prompt) or state.tokens != list(prompt[:state.offset]):
        raise ValueError("the KV state must hold a proper prefix of the prompt")
    started = time.perf_counter()
    logits = decoder.prefill(prompt[state.offset:], state)
    spent = time.perf_counter() - started
    history = list(prompt)
    while True:
        scores = logits
        for process in processors:
            scores = process(history, scores)
        token = sampler(scores)
        if top_n:
            logprobs = log_softmax(logits)
            yield token, float(logprobs[token]), top_tokens(logprobs, top_n), spent
        else:
            yield token, sampling.logprob(logits, token), (), spent
        history.append(token)
        started = time.perf_counter()
        logits = decoder.forward([token], state)[-1]
        spent = time.perf_counter() - started


def top_tokens(logprobs: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    if n <= 0:
        return ()
    best = np.argpartition(logprobs, -n)[-n:]
    best = best[np.argsort(-logprobs[best])]
    return tuple((int(t), float(logprobs[t])) for t in best)


def check_prompt(decoder: Decoder, prompt: Sequence[int]) -> None:
    """Refuse a prompt the model cannot take (empty, ids outside the vocabulary, no room left) before any work."""
    if not len(prompt):
        raise ContextError("the prompt is empty")
    vocab = decoder.shape["vocab_size"]
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise ContextError(f"the prompt has token ids outside the vocabulary (0 to {vocab - 1})")
    if len(prompt) >= decoder.context_length:
        raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context holds {decoder.context_length}; "
                                 f"shorten it (nothing was cut)")


def stream(decoder: Decoder, tokenizer: Tokenizer, prompt: Sequence[int], params: GenerationParams,
           eos_ids: Sequence[int] = (), state: KVState | None = None) -> Iterator[Record]:
    """Records of generated text until eos, a stop string, max_tokens or a full context. The prompt is checked
    here, at the call, not when the first record is asked for.

    state: a KV state to continue (e.g. the last generation's): its longest prefix shared with the prompt is kept
    and only the rest is prefilled; left holding this generation's tokens. None starts from a fresh one."""
    check_prompt(decoder, prompt)
    if state is None:
        state = decoder.new_state()
    else:
        state.trim(min(common_prefix(state.tokens, prompt), len(prompt) - 1))
    return _records(decoder, tokenizer, prompt, params, eos_ids, state)


def _records(decoder: Decoder, tokenizer: Tokenizer, prompt: Sequence[int], params: GenerationParams,
             eos_ids: Sequence[int], state: KVState) -> Iterator[Record]:
    limit = min(params.max_tokens, decoder.context_length - len(prompt))
    if limit == 0:
        return
    started, cached = time.perf_counter(), state.offset
    sampler = make_sampler(params.temperature, params.top_k, params.top_p, params.min_p, params.seed)
    processors = make_processors(params.repetition_penalty, params.presence_penalty, params.frequency_penalty,
                                 len(prompt))
    steps = step(decoder, state, prompt, sampler, processors, params.top_logprobs)
    eos_ids = () if params.ignore_eos else eos_ids
    detok, stops = tokenizer.detokenizer(prompt), StopMatcher(params.stop)

    def record(text, token, logprob, finish, top, spent):
        pieces = tuple(tokenizer.decode_one(t) for t, _ in top)
        return Record(text, token, logprob, finish, top, tokenizer.decode_one(token), pieces, cached,
                      time.perf_counter() - started, spent)
    for count, (token, logprob, top, spent) in enumerate(steps, start=1):
        if token in eos_ids:
            text, _ = stops.finish(detok.flush())
            yield record(text, token, logprob, "stop", top, spent)
            return
        text, stopped = stops.feed(detok.add(token))
        if not stopped and count == limit:
            tail, stopped = stops.finish(detok.flush())
            text += tail
        if stopped or count == limit:
            yield record(text, token, logprob, "stop" if stopped else "length", top, spent)
            return
        yield record(text, token, logprob, None, top, spent)


def generate(decoder: Decoder, tokenizer: Tokenizer, prompt: Sequence[int], params: GenerationParams,
             eos_ids: Sequence[int] = (), state: KVState | None = None) -> str:
    return "".join(record.text for record in stream(decoder, tokenizer, prompt, params, eos_ids, state))


class StopMatcher:
    """Holds back text that might be the start of a stop string, and cuts at the first stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[:min(hits)], ""
            return out, True
        keep = max((self._partial(s) for s in self.stops), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def finish(self, text: str) -> tuple[str, bool]:
        """The last text: everything still held comes out unless a stop string cuts it."""
        out, stopped = self.feed(text)
        if not stopped:
            out, self.held = out + self.held, ""
        return out, stopped

    def _partial(self, stop: str) -> int:
        """Length of the longest suffix of the held text that is a prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(self.held)), 0, -1):
            if self.held.endswith(stop[:n]):
                return n
        return 0
