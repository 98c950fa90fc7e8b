"""The generation loop as layered generators.

`step` yields `Token`s: prefill, then one decode step per token, through a decoder adapter (edge/decoder.py) and a
KV state it is given (edge/cache.py); `speculative_step` yields the same, several per forward pass where a drafted
continuation (edge/draft.py) is verified and accepted. `stream` turns them into
`Record`s of text, honouring eos ids, stop strings and max_tokens. `generate` joins a stream into a string.
The CLI, the HTTP server and embedding products consume `stream` and nothing below it.
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np

from edge import sampling
from edge.cache import KVState, common_prefix
from edge.constraint import Constraint, Matcher
from edge.decoder import Decoder
from edge.draft import PassCosts, PromptLookup
from edge.sampling import Processor, Sampler, draw, log_softmax, make_distribution, make_processors, make_sampler
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
    logprobs: bool = True  # each token's log-probability in its record; False leaves it None and skips a pass
    # over the vocabulary per token (about 0.1 ms of a 5 ms step with a 49k vocabulary), as the server does for
    # a request that did not ask for logprobs
    seed: int | None = None  # fixes the random draws; None draws a fresh seed
    stop: list[str] = field(default_factory=list)  # strings that end generation; not included in the text
    ignore_eos: bool = False  # generate past end-of-sequence tokens, up to max_tokens (benchmarks, as llama.cpp's)
    speculate: bool = False  # draft from the prompt and verify several tokens per pass (same output distribution)
    constraint: Constraint | None = None  # the output must match it (a schema, grammar or regex: edge/constraint.py)

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
    logprob: float | None  # its log-probability under the model's raw distribution (log-softmax of the logits);
    # None where the generation was asked not to compute it (logprobs=False)
    finish_reason: str | None  # None, "stop" (eos or stop string) or "length"
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token, logprob) of the most likely tokens, when asked
    piece: str = ""  # the token's own text as it reads mid-sentence, special tokens included (for logprobs)
    top_pieces: tuple[str, ...] = ()  # the texts of the top_logprobs tokens, in their order
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not prefilled
    seconds: float = 0.0  # from the start of the stream to this record
    compute_seconds: float = 0.0  # of which spent in the decoder for this record (the first: the prefill too)
    step_tokens: int = 1  # tokens the forward pass that produced this one produced (on its first record; else 0)
    drafted: int = 0  # drafted tokens that pass verified (on its first record)

    @property
    def accepted(self) -> int:
        """Drafted tokens this record's pass accepted (on its first record; else 0)."""
        return self.step_tokens - 1 if self.drafted else 0


class Token(NamedTuple):
    """What a step generator yields per token."""

    token: int
    logprob: float | None  # under the raw distribution (log-softmax of the logits); None if not asked for
    top: tuple[tuple[int, float], ...]  # the top_n most likely (token, logprob)
    spent: float  # seconds in the decoder for the pass that produced it (0 for the rest of that pass's tokens)
    step_tokens: int = 1  # tokens that pass produced (0 for the rest of them)
    drafted: int = 0  # drafted tokens that pass verified

    accepted = Record.accepted


def step(decoder: Decoder, state: KVState, prompt: Sequence[int], sampler: Sampler, processors: list[Processor],
         top_n: int = 0, ahead: Callable[[list[int]], None] | None = None, logprobs: bool = True) -> Iterator[Token]:
    """Prefill what the state lacks of the prompt, then yield a Token per forward pass forever; the consumer
    decides when to stop. The state must hold a prefix of the prompt, shorter than it, and is left holding the
    prompt and every yielded token but the last. ahead: work on the history to start before each forward pass
    and overlap it (a constraint's next mask)."""
    _check_prefix(state, prompt)
    started = time.perf_counter()
    logits = decoder.prefill(prompt[state.offset:], state)
    spent = time.perf_counter() - started
    history = list(prompt)
    while True:
        token = sampler(_processed(processors, history, logits))
        yield _token(logits, token, top_n, spent, logprobs)
        history.append(token)
        if ahead is not None:
            ahead(history)
        started = time.perf_counter()
        logits = decoder.forward([token], state)[-1]
        spent = time.perf_counter() - started


MAX_FORCED = 32  # a constraint's forced tokens drafted in one pass: a long literal is split over a few passes


def speculative_step(decoder: Decoder, state: KVState, prompt: Sequence[int], params: GenerationParams,
                     processors: list[Processor], budget: int, drafter: PromptLookup | None = None,
                     matcher: Matcher | None = None, lookup: bool = True) -> Iterator[Token]:
    """As step, but each pass after the prefill feeds the last token and a draft of the tokens after it, and
    yields the draft's longest accepted prefix and one more token. Exact in distribution: a drafted token is
    accepted with its probability under the final sampling distribution at its position (penalties seeing the
    tokens accepted before it), else the token is drawn from that distribution without it (speculative sampling
    with a draft that is certain of its guess); greedy accepts exactly the argmax. budget: the most tokens the
    consumer will take (drafts never run past it). The state is left as step leaves it, however far the last
    pass got or wherever the consumer stops. matcher: a constraint's, also among the processors; drafts are cut
    where it would refuse them, and the tokens it forces are drafted before any lookup. lookup=False drafts only
    those (constrained output without speculation: a JSON key costs one pass, not one per token)."""
    _check_prefix(state, prompt)
    costs = pass_costs(decoder)
    drafter = drafter or PromptLookup(costs=costs)
    distribution = (None if params.temperature == 0 else
                    make_distribution(params.temperature, params.top_k, params.top_p, params.min_p))
    rng = np.random.default_rng(params.seed)
    history, draft, looked_up = list(prompt), [], 0
    started = time.perf_counter()
    rows = decoder.prefill(prompt[state.offset:], state)[None]
    spent = time.perf_counter() - started
    if lookup and not costs.calibrated:
        calibrate(decoder, state, costs)
    try:
        while True:  # one forward pass per round: rows[i] predicts the token after draft[:i]
            tokens = _accept(rows, draft, processors, distribution, rng, history)
            drafter.update(looked_up, min(looked_up, len(tokens) - 1))  # forced drafts teach the lookup nothing
            state.trim(state.offset - (len(draft) - (len(tokens) - 1)))  # the rejected drafts' keys go
            for i, token in enumerate(tokens):
                history.append(token)
                first = i == 0
                yield _token(rows[i], token, params.top_logprobs, spent if first else 0.0, params.logprobs)._replace(
                    step_tokens=len(tokens) if first else 0, drafted=len(draft) if first else 0)
            room = min(budget - (len(history) - len(prompt)), decoder.context_length - state.offset) - 1
            forced = matcher.forced(history)[:min(room, MAX_FORCED)] if matcher is not None and room > 0 else []
            draft = forced or (drafter.draft(history, room) if lookup else [])
            if matcher is not None and not forced:
                draft = draft[:matcher.valid(history, draft)]
            looked_up = 0 if forced else len(draft)
            if matcher is not None:
                matcher.ahead(history)  # the first row's mask, computed while the pass runs
            started = time.perf_counter()
            rows = decoder.forward([history[-1]] + draft, state, keep=1 + len(draft))[-1 - len(draft):]
            spent = time.perf_counter() - started
            costs.observe(len(rows), spent)
    finally:  # a consumer that stopped mid-pass: forget the tokens it never took, as plain decoding would
        if state.offset > len(history) - 1:
            state.trim(len(history) - 1)


_costs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pass_costs(decoder: Decoder) -> PassCosts:
    """The decoder's pass costs by row count, shared by its generations (they depend on the model and the CPU)."""
    if decoder not in _costs:
        _costs[decoder] = PassCosts()
    return _costs[decoder]


def calibrate(decoder: Decoder, state: KVState, costs: PassCosts, most: int = 9, repeats: int = 2) -> None:
    """Time a pass of each row count up to `most` once per decoder (about 30 one-token steps' worth), on the
    state's end and trimmed off again, so that the first drafts are sized by this CPU's costs."""
    offset = state.offset
    if decoder.context_length - offset < most:
        return
    seconds = {}
    for rows in range(1, most + 1):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            decoder.forward([0] * rows, state, keep=rows)
            times.append(time.perf_counter() - started)
            state.trim(offset)
        seconds[rows] = min(times)  # a stall only ever adds time
    costs.set_from(seconds)


def _accept(rows: np.ndarray, draft: list[int], processors: list[Processor], distribution, rng: np.random.Generator,
            history: list[int]) -> list[int]:
    """The accepted prefix of the draft and the token after it (drawn where the draft ran out or was rejected)."""
    accepted: list[int] = []
    if distribution is None:  # greedy: the same rule, without building one-hot distributions
        for i, row in enumerate(rows):
            best = int(np.argmax(_processed(processors, history + accepted, row) if processors else row))
            if i == len(draft) or best != draft[i]:
                return accepted + [best]
            accepted.append(best)
    for i, row in enumerate(rows):
        probs = distribution(_processed(processors, history + accepted, row))
        if i == len(draft):
            return accepted + [draw(probs, rng)]
        guess = draft[i]
        if rng.random() < probs[guess]:
            accepted.append(guess)
            continue
        probs[guess] = 0.0  # the residual of a certain draft: the distribution without the rejected token
        return accepted + [draw(probs, rng)]
    raise AssertionError("one row more than the draft")


def _processed(processors: list[Processor], history: list[int], logits: np.ndarray) -> np.ndarray:
    for process in processors:
        logits = process(history, logits)
    return logits


def _token(logits: np.ndarray, token: int, top_n: int, spent: float, with_logprob: bool = True) -> Token:
    if top_n:
        logprobs = log_softmax(logits)
        return Token(token, float(logprobs[token]), top_tokens(logprobs, top_n), spent)
    return Token(token, sampling.logprob(logits, token) if with_logprob else None, (), spent)


def _check_prefix(state: KVState, prompt: Sequence[int]) -> None:
    if state.offset >= len(prompt) or state.tokens != list(prompt[:state.offset]):
        raise ValueError("the KV state must hold a proper prefix of the prompt")


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
    matcher = params.constraint.start(len(prompt)) if params.constraint is not None else None
    if matcher is not None:
        processors.append(matcher)  # last: the mask decides what may follow whatever the penalties did
    if decoder.verifies and (params.speculate or matcher is not None):
        steps = speculative_step(decoder, state, prompt, params, processors, limit, matcher=matcher,
                                 lookup=params.speculate)
    else:
        steps = step(decoder, state, prompt, sampler, processors, params.top_logprobs,
                     matcher.ahead if matcher is not None else None, params.logprobs)
    eos_ids = () if params.ignore_eos else eos_ids
    detok, stops = tokenizer.detokenizer(prompt), StopMatcher(params.stop)

    def record(text, t: Token, finish):
        pieces = tuple(tokenizer.decode_one(token) for token, _ in t.top)
        return Record(text, t.token, t.logprob, finish, t.top, tokenizer.decode_one(t.token), pieces, cached,
                      time.perf_counter() - started, t.spent, t.step_tokens, t.drafted)
    history = list(prompt)
    with closing(steps):  # the step generator leaves the state as it should be once closed, here and now
        for count, t in enumerate(steps, start=1):
            if t.token in eos_ids:
                text, _ = stops.finish(detok.flush())
                yield record(text, t, "stop")
                return
            text, stopped = stops.feed(detok.add(t.token))
            history.append(t.token)
            complete = matcher is not None and _complete(matcher, history)
            if not stopped and (count == limit or complete):
                tail, stopped = stops.finish(detok.flush())
                text += tail
            if stopped or complete or count == limit:
                yield record(text, t, "stop" if stopped or complete else "length")
                return
            yield record(text, t, None)


def _complete(matcher: Matcher, history: list[int]) -> bool:
    """The constrained output is whole: nothing but end-of-sequence could follow, so stop without that pass."""
    matcher.sync(history)
    return matcher.finished


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
