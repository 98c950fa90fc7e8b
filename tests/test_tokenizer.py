"""Real tokenizers through the exporter and the runtime: ids, text, chat templates and streaming equal transformers'."""
from __future__ import annotations

import sys

import jinja2
import pytest
from families import BY_NAME, TOKENIZERS, shared, write_tokenizer
from transformers import AutoTokenizer

from edge.chat import ChatTemplate, ChatTemplateError
from edge.tokenizer import Tokenizer
from edge.export.pipeline import _write_tokenizer

# tokenizer under test -> a family that uses it (for its chat template) and llama.cpp's reference vectors
CASES = {
    "gpt2": ("smollm2", "gpt-2"), "llama2": ("tinyllama", "llama-spm"), "llama3": ("llama3.2", "llama-bpe"),
    "qwen3": ("qwen3", "qwen2"), "phi3": ("phi3", "phi-3"), "mistral": ("mistral", None), "trained": ("gemma2", None),
}
TEXTS = [
    "Hello world", " leading space", "multiple   spaces\tand\ttabs\n\nnewlines", "Ünïcödé àccents",
    "日本語のテキストと中文", "emoji 🦙🚀 and ZWJ 👩‍👩‍👧", "def f(x):\n    return x ** 2  # code", "1234567890 3.14159",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi! 👋"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 日本"}],
]


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers tokenizer, our Tokenizer, our ChatTemplate or None, name) for one real tokenizer."""
    name = request.param
    family = BY_NAME[CASES[name][0]]
    src, bundle = tmp_path_factory.mktemp(f"src-{name}"), tmp_path_factory.mktemp(f"bundle-{name}")
    write_tokenizer(family, src)
    theirs = AutoTokenizer.from_pretrained(src)
    entries = _write_tokenizer(theirs, bundle)
    template = entries["chat_template"]
    ours = Tokenizer(bundle / entries["tokenizer"]["file"])
    chat = ChatTemplate((bundle / template).read_text(), entries["tokenizer"]["special_tokens"]) if template else None
    return theirs, ours, chat, name


def test_ids_and_text_match_transformers(pair):
    theirs, ours, _, _ = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == theirs(text, add_special_tokens=special).input_ids
        ids = theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_llamacpp_reference_vectors(pair):
    _, ours, _, name = pair
    vectors = CASES[name][1]
    if vectors is None:
        pytest.skip(f"llama.cpp ships no reference vectors for the {name} tokenizer")
    sys.path.insert(0, str(shared(TOKENIZERS)))
    from tok_tests import load_vectors

    texts, want = load_vectors(vectors)
    got = [ours.encode(t, add_special_tokens=False) for t in texts]
    mismatches = [t for t, g, w in zip(texts, got, want) if g != w]
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, e.g. {mismatches[:3]}"


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["single", "system-multi-turn"])
def test_chat_template_renders_like_transformers(pair, conversation):
    theirs, ours, chat, name = pair
    if chat is None:
        pytest.skip(f"the {name} tokenizer has no chat template")
    try:
        want = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError:  # the model's template refuses (e.g. Mistral: no system role): so must we
        with pytest.raises(ChatTemplateError):
            chat.render(conversation)
        return
    assert chat.render(conversation) == want
    assert ours.encode(want, add_special_tokens=False) == theirs.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=True)


def test_streaming_never_splits_a_character(pair):
    _, ours, _, _ = pair
    context = ours.encode("Start:")
    for text in TEXTS:
        generated = ours.encode(" " + text, add_special_tokens=False)
        detok = ours.detokenizer(context)
        pieces = [detok.add(t) for t in generated] + [detok.flush()]
        assert all("\ufffd" not in p for p in pieces)
        full = ours.decode(context + generated)
        assert "".join(pieces) == full[len(ours.decode(context)):]


def test_chat_template_checks_messages():
    chat = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}", {})
    for bad, match in [([], "non-empty"), ([{"role": "robot", "content": "x"}], "role"),
                       ([{"role": "user", "content": 3}], "content"), ("hi", "non-empty")]:
        with pytest.raises(ChatTemplateError, match=match):
            chat.render(bad)


def test_single_token_text_keeps_its_leading_space(pair):
    theirs, ours, _, name = pair
    ids = ours.encode("Hello there world", add_special_tokens=False)
    pieces = [ours.decode_one(t) for t in ids]
    assert "".join(pieces).strip() == "Hello there world"
    assert any(p.startswith(" ") for p in pieces[1:]), pieces
