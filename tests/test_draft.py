"""Prompt-lookup drafting (edge/draft.py) and speculative decoding (edge/generate.py's speculative_step): the same
greedy output as plain decoding on every family, the same output distribution when sampling (chi-square against
the exact distribution), stop strings and max_tokens cut where plain decoding cuts, and the KV state left as plain
decoding leaves it."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import drafts_pay
from families import FAMILIES

import edge
from edge import generate as gen
from edge.cache import KVState
from edge.decoder import Decoder
from edge.draft import DraftSettings, PassCosts, PromptLookup
from edge.sampling import make_distribution, make_processors


def test_the_draft_follows_the_latest_earlier_occurrence_of_the_last_ngram():
    settings = DraftSettings(max_draft=4, max_ngram=3, min_ngram=2)
    history = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7]
    # [5, 6, 7] last occurred before [2, 3, 5, 6, 7]: that one
    assert PromptLookup(settings).lookup(history, 10) == ([2, 3, 5, 6, 7], 3)
    assert PromptLookup(settings).lookup(history, 1) == ([2], 3)  # never more than asked
    assert PromptLookup(settings).lookup([1, 2, 3, 4, 9, 3, 4], 10) == ([9, 3, 4], 2)  # no 3-gram: the 2-gram
    assert PromptLookup(settings).lookup([1, 2, 3, 4, 2], 10) == ([], 0)  # a single token is not enough
    growing, drafter = [1, 2, 3], PromptLookup(settings)  # one drafter follows a text as it grows
    found = []
    for token in [4, 1, 2, 3]:
        growing.append(token)
        found.append(drafter.lookup(growing, 5))
    assert found == [([], 0), ([], 0), ([3, 4, 1, 2], 2), ([4, 1, 2, 3], 3)]


def costs(*seconds: float) -> PassCosts:
    """Pass costs by row count, from one row up."""
    return PassCosts().set_from({rows: s for rows, s in enumerate(seconds, start=1)})


def test_the_draft_size_is_the_fastest_for_the_acceptance_and_this_cpus_pass_costs():
    tiled = costs(1.0, 1.06, 1.09, 1.2, 1.64, 1.8, 1.95, 2.1, 2.27)  # four rows nearly free, the fifth is not
    drafter = PromptLookup(DraftSettings(max_draft=8), tiled)
    assert drafter.best_size(0.95, 8) == 8  # a copy: the longest draft
    assert drafter.best_size(0.7, 8) == 3  # as many as the cheap tile holds
    assert drafter.best_size(0.7, 2) == 2  # never more than the lookup found
    assert drafter.best_size(0.03, 8) == 0  # chance matches: plain decoding is faster
    flat = PromptLookup(DraftSettings(max_draft=8), costs(*[1.0] * 9))
    assert flat.best_size(0.3, 8) == 8  # where rows cost nothing, draft all
    assert tiled.of(12) == pytest.approx(2.27 * 1.3)


def test_pass_costs_follow_a_slower_machine_in_proportion_and_one_stall_moves_them_a_bounded_step():
    measured = costs(1.0, 1.2, 1.5, 1.8)
    for _ in range(30):  # the board slows to half speed; only one-row passes are run
        measured.observe(1, 2.0)
    assert measured.of(1) == pytest.approx(2.0, rel=0.01) and measured.of(4) == pytest.approx(3.6, rel=0.01)  # not 1.8
    for _ in range(30):  # four-row passes turn out cheaper than calibrated: their ratio follows
        measured.observe(4, 3.0)
        measured.observe(1, 2.0)
    assert measured.of(4) == pytest.approx(3.0, rel=0.02) and measured.of(1) == pytest.approx(2.0, rel=0.02)
    steady = costs(1.0, 1.2)
    steady.observe(2, 60.0)  # one pass stalled by something else on the machine
    assert steady.of(1) <= 1.1 and steady.of(2) <= 1.2 * 1.1 * 1.1
    assert PassCosts().of(3) == pytest.approx(1.2)  # nothing measured: 10% per extra row


def test_acceptance_is_counted_per_ngram_length_and_low_rates_stop_drafting_but_probe():
    drafter = PromptLookup(DraftSettings(max_draft=8, max_ngram=3, min_ngram=2, probe_after=3),
                           costs(1.0, 1.06, 1.09, 1.2, 1.64, 1.8, 1.95, 2.1, 2.27))
    history = list(range(20)) * 2
    assert len(drafter.draft(history, 100)) == 2 and drafter.last_n == 3  # the prior (0.5) at these costs
    for _ in range(30):
        drafter.update(2, 0)  # rejected again and again
    assert drafter.hits[3] / drafter.trials[3] < 0.01 and drafter.hits[2] == 1.0  # the 2-grams' rate untouched
    assert [drafter.draft(history, 100) for _ in range(3)] == [[], [], [0]]  # idle, then a one-token probe
    for _ in range(30):
        drafter.update(8, 8)
    assert len(drafter.draft(history, 100)) == 8


def test_calibration_times_each_pass_size_and_leaves_the_state_as_it_was(exports):
    engine = edge.load(exports.bundle("qwen3"), context_length=128, prefix_cache_mb=0)
    state = engine.decoder.new_state()
    engine.decoder.prefill(list(range(3, 20)), state)
    before, measured = state.tokens, PassCosts()
    gen.calibrate(engine.decoder, state, measured)
    assert measured.calibrated and sorted(measured.ratios) == list(range(1, 10))
    assert state.tokens == before and state.offset == 17
    assert measured.base > 0 and all(r > 0 for r in measured.ratios.values())


class MarkovDecoder(Decoder):
    """Logits that depend on the last token only, every position returned: a model whose distribution over
    continuations is known exactly."""

    every_position = True
    context_length = 256

    def __init__(self, table: np.ndarray):
        self.table = table  # [vocab, vocab]: logits of the next token after each token
        self.shape = {"vocab_size": table.shape[0]}

    def new_state(self) -> KVState:
        return KVState(1, 1, 1)

    def forward(self, ids, state, keep=1):
        state.append(ids)
        return self.table[np.asarray(ids)].astype(np.float32)


def markov_table(vocab: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.2, size=(vocab, vocab))


PROMPT = [0, 1, 2, 0, 1, 2, 0, 1]  # its last 2-gram recurs: the first pass drafts [2, 0, 1, ...]
SAMPLING = [dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
            dict(temperature=0.7, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.3)]


def exact_distribution(decoder: MarkovDecoder, params: gen.GenerationParams, n: int) -> dict[tuple, float]:
    """P(first n generated tokens), by enumeration, through the same penalties and warping as plain sampling."""
    distribution = make_distribution(params.temperature, params.top_k, params.top_p, params.min_p)
    processors = make_processors(params.repetition_penalty, params.presence_penalty, params.frequency_penalty,
                                 len(PROMPT))
    out = {}
    for seq in itertools.product(range(decoder.shape["vocab_size"]), repeat=n):
        history, p = list(PROMPT), 1.0
        for token in seq:
            logits = decoder.table[history[-1]]
            for process in processors:
                logits = process(history, logits)
            p *= distribution(logits)[token]
            history.append(token)
        out[seq] = p
    return out


@pytest.mark.parametrize("sampling", SAMPLING, ids=["plain", "warped+penalty"])
def test_speculative_sampling_draws_from_the_same_distribution(sampling):
    decoder = MarkovDecoder(markov_table())
    params = gen.GenerationParams(max_tokens=3, **sampling)
    exact = exact_distribution(decoder, params, 3)
    counts = dict.fromkeys(exact, 0)
    drafted = accepted = 0
    runs = 3000
    for seed in range(runs):
        params.seed = seed
        tokens = []
        for t in gen.speculative_step(decoder, decoder.new_state(), PROMPT, params,
                                      make_processors(params.repetition_penalty, 0, 0, len(PROMPT)), budget=3,
                                      drafter=PromptLookup(costs=costs(*[1.0] * 9))):  # draft whatever matches
            tokens.append(t.token)
            drafted, accepted = drafted + t.drafted, accepted + t.accepted
            if len(tokens) == 3:
                break
        counts[tuple(tokens)] += 1
    assert drafted > 500 and 0 < accepted < drafted  # drafts were verified, some accepted, some not
    # chi-square over cells expected at least 5 times, the rest pooled
    cells = [(counts[s], p * runs) for s, p in exact.items() if p * runs >= 5]
    rest = (runs - sum(c for c, _ in cells), runs - sum(e for _, e in cells))
    cells += [rest] if rest[1] >= 5 else []
    chi2 = sum((c - e) ** 2 / e for c, e in cells)
    df = len(cells) - 1
    # the 0.999 quantile of chi-square is below df + 3.3 sqrt(2 df) + 6 for these df: fails by chance 1 in 1000
    assert chi2 < df + 3.3 * np.sqrt(2 * df) + 6, f"chi-square {chi2:.1f} with {df} degrees of freedom"


def test_a_stop_string_inside_an_accepted_draft_cuts_where_plain_decoding_cuts():
    from families import TOKENIZERS, shared

    from edge.tokenizer import Tokenizer

    tokenizer = Tokenizer(shared(TOKENIZERS / "qwen3") / "tokenizer.json")
    passage = tokenizer.encode("The quick brown fox jumps over the lazy dog and runs into the old forest at night.")
    prompt = passage + tokenizer.encode(" Again: The quick")
    decoder = CopyingDecoder(passage[2:], len(prompt))  # the answer copies the passage from "brown"
    results = {}
    for speculate in (False, True):
        params = gen.GenerationParams(temperature=0, max_tokens=30, stop=["the lazy"], speculate=speculate)
        state = decoder.new_state()
        records = list(gen.stream(decoder, tokenizer, prompt, params, (), state))
        results[speculate] = ("".join(r.text for r in records), records[-1].finish_reason, state.tokens)
    assert results[True] == results[False]
    assert results[True][0] == " brown fox jumps over " and results[True][1] == "stop"


class CopyingDecoder(Decoder):
    """Greedy logits that spell a fixed answer after the prompt, by position, every position returned."""

    every_position = True
    context_length = 512
    shape = {"vocab_size": 151669}

    def __init__(self, answer: list[int], prompt_length: int):
        self.answer, self.prompt_length = answer, prompt_length
        self.passes: list[int] = []  # tokens fed per forward pass

    def new_state(self) -> KVState:
        return KVState(1, 1, 1)

    def forward(self, ids, state, keep=1):
        start = state.offset
        state.append(ids)
        self.passes.append(len(ids))
        logits = np.zeros((len(ids), self.shape["vocab_size"]), np.float32)
        for row, position in enumerate(range(start, start + len(ids))):
            logits[row, self.answer[min(max(position + 1 - self.prompt_length, 0), len(self.answer) - 1)]] = 10.0
        return logits


def test_max_tokens_and_an_early_stop_leave_the_state_as_plain_decoding_does():
    seq = list(range(100, 112))
    prompt = seq + seq[:4]
    decoder = CopyingDecoder(seq[4:] + seq * 3, len(prompt))  # the answer goes on copying: drafts are accepted
    flat = gen.pass_costs(decoder)  # as if rows cost nothing: every draft as long as the room allows
    flat.set_from({rows: 1.0 for rows in range(1, 10)})
    for max_tokens in (1, 5, 17):
        states = {}
        for speculate in (False, True):
            state = decoder.new_state()
            params = gen.GenerationParams(temperature=0, max_tokens=max_tokens, speculate=speculate)
            tokens = [r.token for r in gen.stream(decoder, NullTokenizer(), prompt, params, (), state)]
            states[speculate] = (tokens, list(state.tokens))
        assert states[True] == states[False]
    state = decoder.new_state()
    stream = gen.stream(decoder, NullTokenizer(), prompt, gen.GenerationParams(temperature=0, speculate=True), (),
                        state)
    taken = [next(stream).token for _ in range(4)]
    flat.set_from({rows: 1.0 for rows in range(1, 10)})  # the passes so far have timed themselves in
    assert [r.step_tokens for r in gen.stream(decoder, NullTokenizer(), prompt,
                                              gen.GenerationParams(temperature=0, max_tokens=6, speculate=True))] \
        == [1, 5, 0, 0, 0, 0]  # the prefill's token, then a pass of 4 accepted drafts and one more
    stream.close()  # mid-pass: the consumer took 3 of the second pass's 9 tokens
    assert state.tokens == prompt + taken[:-1]


class NullTokenizer:
    """A stand-in with the two methods stream uses."""

    def detokenizer(self, prompt):
        class Detok:
            def add(self, token):
                return ""

            def flush(self):
                return ""
        return Detok()

    def decode_one(self, token):
        return ""


FAST = [f.name for f in FAMILIES]


class ScriptDrafter:
    """Drafts a known continuation, every third drafted token wrong: both the accepting and the rejecting paths of
    verification run, whatever a random-init model writes."""

    def __init__(self, continuation: list[int], prompt_length: int, vocab: int):
        self.continuation, self.prompt_length, self.vocab = continuation, prompt_length, vocab
        self.drafted = 0

    def draft(self, history, room):
        done = len(history) - self.prompt_length
        draft = self.continuation[done:done + min(4, room)]
        self.drafted += len(draft)
        return [t if (self.drafted + i) % 3 else (t + 1) % self.vocab for i, t in enumerate(draft)]

    def update(self, drafted, accepted):
        pass


@pytest.mark.parametrize("name", FAST)
def test_greedy_output_is_the_same_with_speculation(exports, name):
    """Tokens identical where the top-2 margin exceeds 1e-3 (past a near tie the two may part), log-probabilities
    within 1e-4, with drafts of several tokens verified in one pass of the fast graph."""
    engine = edge.load(exports.bundle(name), context_length=128, prefix_cache_mb=0)
    assert engine.decoder.verifies
    ids = np.random.default_rng(1).integers(3, 400, size=20).tolist()
    plain = list(engine.stream(ids, temperature=0, max_tokens=24, top_logprobs=2, ignore_eos=True, speculate=False))
    drafter = ScriptDrafter([r.token for r in plain], len(ids), engine.decoder.shape["vocab_size"])
    params = gen.GenerationParams(temperature=0, max_tokens=24, top_logprobs=2)
    steps = gen.speculative_step(engine.decoder, engine.decoder.new_state(), ids, params, [], 24, drafter)
    fast = list(itertools.islice(steps, 24))
    assert sum(t.drafted for t in fast) > 0 and max(t.step_tokens for t in fast) > 1
    for p, f in zip(plain, fast):
        margin = p.top_logprobs[0][1] - p.top_logprobs[1][1]
        if p.token != f.token:
            assert margin <= 1e-3, f"speculation changed a greedy token with a margin of {margin}"
            return
        np.testing.assert_allclose([lp for _, lp in f.top], [lp for _, lp in p.top_logprobs], atol=1e-4)


@pytest.mark.parametrize("name", ["stories260K", "smollm2-135m"])
def test_real_models_write_the_same_text_with_speculation(exports, name):
    engine = edge.load(exports.bundle(name, "int4"), prefix_cache_mb=0)
    if name == "stories260K":
        text = "Lily had a red ball. She played with the red ball in the park. Lily had a red"
        prompt = {"prompt": text}
    else:
        passage = ("The library opens at nine in the morning and closes at six in the evening. On Saturdays it "
                   "closes at noon. It is closed on Sundays and on public holidays.")
        prompt = {"messages": [{"role": "user", "content": f"{passage}\n\nRepeat the text above word for word."}]}
    drafts_pay(engine.decoder)
    plain = "".join(r.text for r in engine.stream(**prompt, temperature=0, max_tokens=40, speculate=False))
    records = list(engine.stream(**prompt, temperature=0, max_tokens=40, speculate=True))
    assert "".join(r.text for r in records) == plain
    assert sum(r.accepted for r in records) > 0  # several tokens from one pass, at least once
