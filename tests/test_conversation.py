"""Conversations (edge/conversation.py) on the real SmolLM2-135M-Instruct: each turn prefills only its own tokens
and the template's joining tokens, answers as a fresh request would, and a conversation that outgrows the context
is refused with the numbers or drops its oldest turns, as asked."""
from __future__ import annotations

import pytest

import edge

SYSTEM = "You are a helpful assistant. Answer in one short sentence."
TURNS = ["What is the capital of France?", "And the capital of Italy?", "Which of the two is older?"]


@pytest.fixture(scope="module")
def engine(exports):
    return edge.load(exports.bundle("smollm2-135m", "int4"), prefix_cache_mb=32)


def test_each_turn_prefills_only_its_own_tokens(engine):
    chat = engine.conversation(system=SYSTEM)
    args = dict(temperature=0, max_tokens=48)
    first = list(chat.say(TURNS[0], **args))
    assert first[-1].finish_reason == "stop" and first[-1].piece == "<|im_end|>"  # the turn ended itself
    for turn in TURNS[1:]:
        before = list(chat.ids)
        records = list(chat.say(turn, **args))
        prompt = chat.ids[:len(chat.ids) - len(records)]
        assert prompt[:len(before)] == before  # the kept ids, answer tokens and all, start the next prompt
        # ChatML's joining text: the end of the last turn's line, then the user turn and the assistant header.
        joining = engine.tokenizer.encode(f"\n<|im_start|>user\n{turn}<|im_end|>\n<|im_start|>assistant\n",
                                          add_special_tokens=False)
        assert records[0].cached_tokens == len(before) - 1  # all but the last answer token, never fed
        assert len(prompt) - records[0].cached_tokens == 1 + len(joining)
    # and the last answer is what a fresh request with the same history gets
    fresh = engine.generate(messages=chat.messages[:-1], cache_prompt=False, **args)
    assert fresh == chat.messages[-1]["content"]


def test_a_conversation_that_outgrows_the_context(exports):
    small = edge.load(exports.bundle("smollm2-135m", "int4"), context_length=160, prefix_cache_mb=8)
    args = dict(temperature=0, max_tokens=24)
    refusing = small.conversation(system=SYSTEM)
    with pytest.raises(edge.ContextLengthError, match=r"the conversation has \d+ tokens but the context holds 160"):
        for turn in TURNS * 4:
            kept = list(refusing.messages)
            refusing.reply(turn, **args)
    assert refusing.messages == kept  # the refused turn left nothing behind
    dropping = small.conversation(system=SYSTEM, overflow="drop-oldest")
    for turn in TURNS * 4:
        dropping.reply(turn, **args)
    assert dropping.messages[0] == {"role": "system", "content": SYSTEM} and len(dropping.messages) < 1 + 2 * 12
    assert len(dropping.ids) <= 160
