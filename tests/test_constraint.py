"""Constrained output (edge/constraint.py): specs from request fields, llguidance's view of every tokenizer, masks,
and generation that always matches, on every family, with speculation, stop strings and max_tokens."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from families import FAMILIES, TOKENIZERS, shared
from tokenizers import Tokenizer

import edge
from edge.constraint import ConstraintError, Grammars, Spec, ascii_digits, closed, spec_from, token_table

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}}, "required": ["name", "age"]}
DATE = "[0-9]{4}-[0-9]{2}-[0-9]{2}"  # not \\d: that takes any Unicode digit


def test_request_fields_make_one_spec_and_malformed_ones_name_their_field():
    assert spec_from() is None and spec_from(response_format={"type": "text"}) is None
    assert spec_from(response_format={"type": "json_object"}).kind == "json_schema"
    strict = spec_from(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                               "strict": False}})
    assert json.loads(strict.source)["additionalProperties"] is False  # strict or not, the schema is followed
    assert spec_from(grammar='root ::= "a"') == Spec("grammar", 'root ::= "a"', "grammar")
    assert spec_from(json_schema=json.dumps(PERSON)) == spec_from(json_schema=PERSON)
    for fields, param in [({"response_format": {"type": "xml"}}, "response_format.type"),
                          ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
                          ({"response_format": "json"}, "response_format"),
                          ({"regex": DATE, "grammar": 'root ::= "a"'}, "regex"),
                          ({"json_schema": "{not json"}, "json_schema"), ({"json_schema": [1]}, "json_schema"),
                          ({"regex": ""}, "regex"), ({"grammar": 3}, "grammar")]:
        with pytest.raises(ConstraintError) as e:
            spec_from(**fields)
        assert e.value.param == param


def test_objects_that_list_their_properties_take_no_others_unless_they_say_so():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                               "open": {"type": "object", "properties": {}, "additionalProperties": True}},
              "$defs": {"d": {"properties": {"b": {}}}}}
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["properties"]["additionalProperties"] is False
    assert out["properties"]["open"]["additionalProperties"] is True and "additionalProperties" not in out["properties"]
    assert out["$defs"]["d"]["additionalProperties"] is False and closed({"type": "object"}) == {"type": "object"}


@pytest.mark.parametrize("name", ["gpt2", "llama2", "llama3", "qwen3", "phi3"])
def test_every_token_reads_as_the_bytes_the_tokenizer_decodes_it_to(name):
    """Byte-level and SentencePiece vocabularies alike (llguidance's own reading of a tokenizer.json gets a
    byte-level one with a sequence decoder wrong): each token's bytes decode to its text, specials marked."""
    text = (shared(TOKENIZERS / name) / "tokenizer.json").read_text(encoding="utf-8")
    backend, data = Tokenizer.from_str(text), json.loads(text)
    vocab = backend.get_vocab_size()
    table, special = token_table(data, vocab + 7)
    assert table[vocab:] == [b""] * 7 and special
    assert all(table[i].startswith(b"\xff") for i in special)
    for i in range(0, vocab, max(1, vocab // 3000)):
        if i in special or "\ufffd" in table[i].decode("utf-8", "replace"):
            continue
        assert table[i].decode("utf-8").strip() == backend.decode([i], skip_special_tokens=False).strip(), i


@pytest.fixture(scope="module")
def stories_grammars():
    path = shared(TOKENIZERS / "llama2") / "tokenizer.json"
    return Grammars(path, Tokenizer.from_file(str(path)).get_vocab_size(), [2])


@pytest.mark.parametrize("fields, reason", [
    ({"regex": "a(b"}, "unclosed group"),
    ({"json_schema": {"type": "frob"}}, "frob"),
    ({"json_schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}, "matches no text"),
    ({"grammar": "start: /[^\\s\\S]/"}, "matches no text"),
    ({"grammar": "root ::= undefined-rule"}, "undefined"),
])
def test_a_constraint_that_cannot_be_built_says_why(stories_grammars, fields, reason):
    with pytest.raises(ConstraintError, match=reason) as e:
        stories_grammars.compile(spec_from(**fields))
    assert e.value.param == next(iter(fields))


def test_a_huge_schema_is_refused_before_it_is_compiled():
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,9}"} for i in range(9000)}}
    with pytest.raises(ConstraintError, match="characters; at most") as e:
        spec_from(json_schema=schema)
    assert e.value.param == "json_schema"


def test_the_mask_allows_exactly_what_the_grammar_can_take_next(stories_grammars):
    tokenizer = Tokenizer.from_file(str(stories_grammars.tokenizer_file))
    table, _ = token_table(json.loads(stories_grammars.tokenizer_file.read_text()), stories_grammars.vocab_size)
    ids = [tokenizer.token_to_id(c) for c in "2024-05-17"]
    matcher = stories_grammars.compile(spec_from(regex=DATE)).start(prompt_length=2)
    history = [1, 5]
    for token in ids:
        masked = matcher(history, np.zeros(stories_grammars.vocab_size, np.float32))
        allowed = np.flatnonzero(masked == 0)
        assert token in allowed and len(allowed) < stories_grammars.vocab_size
        assert all(re.fullmatch(rb"[0-9-]+", table[t]) for t in allowed), [table[t] for t in allowed]
        history.append(token)
        matcher.ahead(history)
    assert matcher.finished
    assert np.flatnonzero(matcher(history, np.zeros(stories_grammars.vocab_size)) == 0).tolist() == [2]  # eos only


@pytest.mark.parametrize("pattern, ascii", [
    (r"\d{4}-\d{2}", "[0-9]{4}-[0-9]{2}"), (r"[\d-]+", "[0-9-]+"), (r"\D+", "[^0-9]+"), (r"[^\D]", r"[^\D]"),
    (r"\\d", r"\\d"), (r"[]\d]", "[]0-9]"), (r"\w\d\.", r"\w[0-9]\."),
])
def test_a_regex_digit_is_an_ascii_digit(pattern, ascii):
    assert ascii_digits(pattern) == ascii


def test_the_mask_of_a_digit_regex_takes_ascii_digits_only(stories_grammars):
    """Rust's \\d takes any Unicode digit (Arabic-Indic, segmented...): the mask must allow ASCII digits only."""
    table, _ = token_table(json.loads(stories_grammars.tokenizer_file.read_text()), stories_grammars.vocab_size)
    matcher = stories_grammars.compile(spec_from(regex=r"\d{4}")).start(prompt_length=2)
    allowed = np.flatnonzero(matcher([1, 5], np.zeros(stories_grammars.vocab_size, np.float32)) == 0)
    assert len(allowed) >= 10 and all(re.fullmatch(rb"[0-9]+", table[t]) for t in allowed), [table[t] for t in allowed]


FAST = [f.name for f in FAMILIES]


@pytest.mark.parametrize("name", FAST)
def test_every_family_writes_output_that_matches(exports, name):
    """Random weights write whatever the mask allows: the schema validates, the regex matches, greedy and sampled,
    and speculation gives the same greedy text."""
    engine = edge.load(exports.bundle(name), context_length=256, prefix_cache_mb=0)
    prompt = "Hello"
    for params in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        records = list(engine.stream(prompt, max_tokens=240, json_schema=PERSON, **params))
        text = "".join(r.text for r in records)
        assert records[-1].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
        dated = engine.generate(prompt, max_tokens=40, regex=DATE, **params)
        assert re.fullmatch(DATE, dated), dated
    plain = engine.generate(prompt, temperature=0, max_tokens=240, json_schema=PERSON)
    assert engine.generate(prompt, temperature=0, max_tokens=240, json_schema=PERSON, speculate=True) == plain


@pytest.mark.parametrize("name", FAST)
def test_forced_tokens_are_drafted_and_greedy_output_is_unchanged(exports, name, monkeypatch):
    """A schema's keys and punctuation are the only text that can follow: drafted, many tokens cost one pass, and
    greedy output is still what one token per pass writes (each forced token is verified like any draft)."""
    engine = edge.load(exports.bundle(name), context_length=256, prefix_cache_mb=0)
    if not engine.decoder.verifies:
        pytest.skip("this graph returns the last position's logits only")
    drafted = list(engine.stream("Hello", temperature=0, max_tokens=240, json_schema=PERSON))
    passes = [r for r in drafted if r.step_tokens]
    # the keys are forced; the whitespace around punctuation is free (JSON_OPTIONS), so it is drafted in pieces
    assert sum(r.accepted for r in passes) >= 2 and len(passes) < len(drafted)
    monkeypatch.setattr(type(engine.decoder), "verifies", property(lambda self: False))
    single = list(engine.stream("Hello", temperature=0, max_tokens=240, json_schema=PERSON))
    assert all(r.step_tokens == 1 for r in single)
    assert [r.token for r in drafted] == [r.token for r in single]
    assert [r.finish_reason for r in drafted] == [r.finish_reason for r in single]


def test_stop_strings_max_tokens_and_logprobs_within_a_structure(exports):
    engine = edge.load(exports.bundle("qwen3"), context_length=256, prefix_cache_mb=0)
    whole = list(engine.stream("Hi", temperature=0, max_tokens=120, json_schema=PERSON, top_logprobs=2))
    text = "".join(r.text for r in whole)
    cut = list(engine.stream("Hi", temperature=0, max_tokens=120, json_schema=PERSON, stop=['"age"']))
    assert cut[-1].finish_reason == "stop" and "".join(r.text for r in cut) == text[:text.index('"age"')]
    short = list(engine.stream("Hi", temperature=0, max_tokens=5, json_schema=PERSON))
    assert short[-1].finish_reason == "length" and [r.token for r in short] == [r.token for r in whole[:5]]
    free = list(engine.stream("Hi", temperature=0, max_tokens=1, top_logprobs=2))
    # logprobs are the raw distribution's, as without a constraint
    assert [t for t, _ in whole[0].top_logprobs] == [t for t, _ in free[0].top_logprobs]
    np.testing.assert_allclose([lp for _, lp in whole[0].top_logprobs], [lp for _, lp in free[0].top_logprobs],
                               atol=1e-5)


def test_the_python_api_takes_response_format_and_refuses_two_constraints(exports):
    engine = edge.load(exports.bundle("qwen3"), context_length=256, prefix_cache_mb=0)
    # (json_object's any-object lets random weights write keys without end: the real model's test has it)
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    jsonschema.validate(json.loads(engine.generate("Hi", temperature=0, max_tokens=240, response_format=schema)),
                        PERSON)
    with pytest.raises(ConstraintError, match="give one of"):
        engine.generate("Hi", regex=DATE, grammar='root ::= "a"')
    assert engine.generate("Hi", temperature=0, max_tokens=8, grammar='root ::= "yes" | "no"') in ("yes", "no")
