"""The generation loop on the demo bundle: finish reasons, stop strings, logprobs, context limits, streaming."""
from __future__ import annotations

import numpy as np
import pytest

import edge
from edge import generate as gen
from edge.cache import KVState
from edge.decoder import Decoder
from edge.sampling import log_softmax

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine():
    return edge.load("demo")


@pytest.fixture(scope="module")
def greedy(engine):
    return list(engine.stream(PROMPT, temperature=0, max_tokens=60))


def test_max_tokens_finishes_with_length(greedy):
    assert len(greedy) == 60
    assert [r.finish_reason for r in greedy] == [None] * 59 + ["length"]


def test_streamed_text_equals_generate_and_full_decode(engine, greedy):
    text = "".join(r.text for r in greedy)
    assert text == engine.generate(PROMPT, temperature=0, max_tokens=60)
    prompt = engine.encode(PROMPT)
    full = engine.tokenizer.decode(prompt + [r.token for r in greedy])
    assert text == full[len(engine.tokenizer.decode(prompt)):]
    assert text.startswith(", there was")


def test_logprobs_are_log_softmax_of_raw_logits(engine, greedy):
    prompt = engine.encode(PROMPT)
    logits = engine.decoder.forward(np.array(prompt + [r.token for r in greedy[:-1]]), engine.decoder.new_state())
    want = log_softmax(logits[len(prompt) - 1:])[np.arange(len(greedy)), [r.token for r in greedy]]
    assert np.allclose([r.logprob for r in greedy], want, atol=1e-4)
    assert all(r.logprob <= 0 for r in greedy)


@pytest.mark.parametrize("speculate", [False, True])
def test_logprobs_off_leaves_them_out_and_nothing_else(engine, greedy, speculate):
    records = list(engine.stream(PROMPT, temperature=0, max_tokens=60, logprobs=False, speculate=speculate))
    assert [r.token for r in records] == [r.token for r in greedy]
    assert "".join(r.text for r in records) == "".join(r.text for r in greedy)
    assert all(r.logprob is None for r in records)
    asked = list(engine.stream(PROMPT, temperature=0, max_tokens=5, logprobs=False, top_logprobs=2))
    assert [r.logprob for r in asked] == pytest.approx([r.logprob for r in greedy[:5]], abs=1e-5)  # top_n needs them


def test_logprobs_ignore_sampling_filters(engine):
    # top_k=1 makes every pick certain, but the reported logprob is the model's own.
    records = list(engine.stream(PROMPT, temperature=1.0, top_k=1, max_tokens=10, seed=0))
    assert any(r.logprob < -1e-3 for r in records)


@pytest.mark.parametrize("cut", [5, 37, 80])
def test_stop_string_cuts_the_text(engine, greedy, cut):
    text = "".join(r.text for r in greedy)
    stop = text[cut:cut + 6]  # may span several tokens
    records = list(engine.stream(PROMPT, temperature=0, max_tokens=60, stop=["zzz", stop]))
    assert "".join(r.text for r in records) == text[:text.index(stop)]
    assert records[-1].finish_reason == "stop"


def test_eos_stops_generation(engine, greedy):
    prompt = engine.encode(PROMPT)
    eos = greedy[10].token
    first = next(i for i, r in enumerate(greedy) if r.token == eos)
    records = list(gen.stream(engine.decoder, engine.tokenizer, prompt, engine.params(temperature=0, max_tokens=60), {eos}))
    assert len(records) == first + 1 and records[-1].finish_reason == "stop" and records[-1].token == eos
    assert "".join(r.text for r in records) == engine.tokenizer.decode(prompt + [r.token for r in greedy[:first]])[
        len(engine.tokenizer.decode(prompt)):]


def test_same_seed_same_text(engine):
    a = engine.generate(PROMPT, temperature=1.0, max_tokens=40, seed=11)
    assert a == engine.generate(PROMPT, temperature=1.0, max_tokens=40, seed=11)
    assert a != engine.generate(PROMPT, temperature=1.0, max_tokens=40, seed=12)


def test_prompt_longer_than_context_is_refused(engine):
    ids = [1] + [300] * engine.context_length
    with pytest.raises(edge.ContextError, match=f"{len(ids)} tokens.*{engine.context_length}"):
        engine.generate(ids)


def test_max_tokens_beyond_the_context_is_clamped(engine):
    ids = engine.encode(PROMPT)
    ids = ids + [300] * (engine.context_length - len(ids) - 3)
    records = list(engine.stream(ids, temperature=0, max_tokens=100))
    assert len(records) == 3 and records[-1].finish_reason == "length"


def test_bad_parameters_are_refused(engine):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(PROMPT, top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(PROMPT, temperature=-1)
    with pytest.raises(TypeError, match="nonsense"):
        engine.generate(PROMPT, nonsense=1)


def test_bundle_defaults_apply_unless_overridden(engine):
    assert engine.params().temperature == 0.0  # stories260K's generation_config says do_sample: false
    assert engine.params(temperature=0.5).temperature == 0.5


@pytest.mark.parametrize("chunks, stops, want, stopped", [
    (["Hel", "lo wor", "ld"], ["lo w"], "Hel", True),
    (["a", "b", "c"], ["bd"], "abc", False),
    (["x<|", "end|>y"], ["<|end|>"], "x", True),
    (["no stops"], [], "no stops", False),
])
def test_stop_matcher(chunks, stops, want, stopped):
    matcher, out, hit = gen.StopMatcher(stops), "", False
    for i, chunk in enumerate(chunks):
        text, hit = matcher.finish(chunk) if i == len(chunks) - 1 else matcher.feed(chunk)
        out += text
        if hit:
            break
    assert (out, hit) == (want, stopped)


class ScriptedDecoder(Decoder):
    """Stands in for the ONNX graph: its logits pick a fixed script of tokens, one per step."""

    context_length = 4096
    shape = {"vocab_size": 151669}
    every_position = True

    def __init__(self, script):
        self.script = script

    def new_state(self):
        return KVState(num_layers=1, num_kv_heads=1, head_dim=1)  # tokens only: there are no keys to keep

    def forward(self, tokens, state, keep=1):
        start = state.offset
        state.append(tokens)
        logits = np.zeros((len(tokens), self.shape["vocab_size"]), dtype=np.float32)
        for row, position in enumerate(range(start, start + len(tokens))):
            logits[row, self.script[min(position - self.prompt_len + 1, len(self.script) - 1)]] = 10.0
        return logits


@pytest.mark.parametrize("text", ["🦙 llamas 🚀 and 👩‍👩‍👧", "日本語のテキストと中文です", "mixed: naïve café ☕ 東京"])
def test_stream_equals_generate_with_emoji_and_cjk(text):
    from families import TOKENIZERS, shared

    from edge.tokenizer import Tokenizer

    tokenizer = Tokenizer(shared(TOKENIZERS / "qwen3") / "tokenizer.json")
    prompt, script = tokenizer.encode("Say:"), tokenizer.encode(" " + text)
    partial = any(tokenizer.decode([t]).endswith("\ufffd") for t in script)
    assert partial or "🦙" not in text  # the emoji case does split characters across tokens
    model = ScriptedDecoder(script)
    model.prompt_len = len(prompt)
    params = gen.GenerationParams(temperature=0, max_tokens=len(script))
    records = list(gen.stream(model, tokenizer, prompt, params))
    assert [r.token for r in records] == script
    assert all("\ufffd" not in r.text for r in records)
    assert "".join(r.text for r in records) == gen.generate(model, tokenizer, prompt, params) == " " + text


def test_token_ids_outside_the_vocabulary_are_refused_at_the_call(engine):
    with pytest.raises(edge.ContextError, match="outside the vocabulary"):
        engine.stream([1, engine.decoder.shape["vocab_size"]])  # raised before any record is asked for


def test_a_stream_dropped_unread_stops_its_generation(engine):
    import gc

    records = engine.stream(PROMPT, temperature=0, max_tokens=200)
    job = records.job
    del records
    gc.collect()
    assert job.cancel.is_set() and job.done.wait(10)  # the worker let go of it, long before 200 tokens
    assert len(list(engine.stream(PROMPT, temperature=0, max_tokens=3))) == 3
