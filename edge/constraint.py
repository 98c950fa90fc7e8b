"""Constrained output: the answer must match a JSON schema, a grammar (GBNF or Lark) or a regex, through llguidance.

A request names its constraint as a `Spec` (plain data, checked by `spec_from`). `Grammars`, one per bundle,
compiles a spec into a `Constraint` against the bundle's vocabulary (the token table is built on the first
constrained request, not at load, so unconstrained use pays nothing); the compiled ones are kept, so a product
that sends one schema every time compiles it once. Each generation starts a `Matcher` from it: a logits processor
that sets every token the grammar cannot take next to -inf, and that can compute the next mask on a helper thread
while the forward pass runs (llguidance and onnxruntime both release the GIL).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

KINDS = ("json_schema", "grammar", "regex")
# Whitespace as llama.cpp's schema grammars allow it (a space, or a newline and an indent of up to 20): a small
# model writes JSON pretty-printed, and forcing it compact takes it off its course, while unbounded whitespace
# lets it pad until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"( |\n[ \t]{0,20})?"}
ANY_OBJECT = '{"type": "object"}'  # response_format json_object
MAX_SOURCE = 256 * 1024  # characters of schema, grammar or regex; more is refused before compiling
KEPT = 32  # compiled constraints kept per bundle
MAPPINGS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema


class ConstraintError(ValueError):
    """A schema, grammar or regex that cannot constrain output (HTTP 400, with llguidance's reason); `param`
    names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Spec:
    kind: str  # "json_schema", "grammar" (GBNF as llama.cpp takes it, or Lark) or "regex"
    source: str  # the schema as JSON text, or the grammar's or the regex's text
    param: str = ""  # the request field it came from, for error messages


def spec_from(response_format=None, grammar=None, json_schema=None, regex=None) -> Spec | None:
    """The one constraint these request fields ask for (OpenAI's response_format, llama.cpp's grammar and
    json_schema, and regex), None for none; ConstraintError for a malformed field or for more than one."""
    formatted = _format_spec(response_format)
    given = [name for name, value in (("response_format", formatted), ("grammar", grammar),
                                      ("json_schema", json_schema), ("regex", regex)) if value is not None]
    if len(given) > 1:
        raise ConstraintError(f"give one of response_format, grammar, json_schema and regex, not {' and '.join(given)}",
                              given[1])
    if formatted is not None:
        spec = formatted
    elif grammar is not None:
        spec = Spec("grammar", _text(grammar, "grammar"), "grammar")
    elif json_schema is not None:
        spec = Spec("json_schema", _schema_text(json_schema, "json_schema"), "json_schema")
    elif regex is not None:
        spec = Spec("regex", _text(regex, "regex"), "regex")
    else:
        return None
    if len(spec.source) > MAX_SOURCE:
        raise ConstraintError(f"{spec.param} has {len(spec.source)} characters; at most {MAX_SOURCE}", spec.param)
    return spec


def _format_spec(value) -> Spec | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema {name, schema, strict}. strict
    false is constrained all the same: the schema is what the answer will follow."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ConstraintError("response_format must be an object with a type", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Spec("json_schema", ANY_OBJECT, "response_format")
    if kind != "json_schema":
        raise ConstraintError(f"response_format.type must be text, json_object or json_schema, not {kind!r}",
                              "response_format.type")
    inner = value.get("json_schema")
    if not isinstance(inner, dict) or "schema" not in inner:
        raise ConstraintError("response_format json_schema needs json_schema: {name, schema}",
                              "response_format.json_schema")
    return Spec("json_schema", _schema_text(inner["schema"], "response_format.json_schema.schema"), "response_format")


def _schema_text(schema, param: str) -> str:
    if isinstance(schema, str):  # a schema already serialised, as the CLI reads it from a file
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ConstraintError(f"{param} is not valid JSON: {e}", param) from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(f"{param} must be a JSON schema object", param)
    return json.dumps(closed(schema))


def closed(schema):
    """The schema with `additionalProperties: false` wherever an object lists its properties and says nothing
    of others, as llama.cpp's schema grammars read it: a small model otherwise invents keys until max_tokens.
    An object with no properties listed (json_object's) still takes any."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({name: closed(s) for name, s in v.items()} if k in MAPPINGS and isinstance(v, dict) else closed(v))
           for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema \
            and "patternProperties" not in schema and "unevaluatedProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _text(value, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConstraintError(f"{param} must be a non-empty string", param)
    return value


class Grammars:
    """One bundle's compiler: its vocabulary as llguidance sees it, and the constraints compiled so far."""

    def __init__(self, tokenizer_file: Path, vocab_size: int, eos_ids: Sequence[int]):
        self.tokenizer_file, self.vocab_size, self.eos_ids = Path(tokenizer_file), vocab_size, sorted(eos_ids)
        self._tokenizer = None
        self._compiled: OrderedDict[Spec, Constraint] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self):
        """llguidance's view of the vocabulary: every token's bytes (built once, ~0.5 s for 150k tokens)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = lltokenizer(self.tokenizer_file.read_text(encoding="utf-8"), self.vocab_size,
                                              self.eos_ids)
            return self._tokenizer

    def compile(self, spec: Spec) -> Constraint:
        """The constraint for spec; ConstraintError with llguidance's reason if it cannot be built, or if it
        allows no output at all."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
        constraint = Constraint(_matcher(self.tokenizer(), spec), self.vocab_size, spec)
        with self._lock:
            self._compiled[spec] = constraint
            while len(self._compiled) > KEPT:
                self._compiled.popitem(last=False)
        return constraint


def ascii_digits(pattern: str) -> str:
    """The regex with `\\d` as [0-9] and `\\D` as [^0-9], as JSON Schema's and JavaScript's regexes read them. Rust's
    syntax, which llguidance follows, lets `\\d` take any Unicode digit, and a small model asked for a date then
    writes digits from other scripts (seen: U+1FBF1, SEGMENTED DIGIT ONE) that an app's parser refuses. Escaped
    backslashes stay as they are; inside a [class] `\\d` becomes 0-9 and `\\D` is left alone."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            if escaped == "d":
                out.append("0-9" if in_class else "[0-9]")
            elif escaped == "D" and not in_class:
                out.append("[^0-9]")
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            start = i + 2 if pattern[i + 1:i + 2] == "^" else i + 1
            if pattern[start:start + 1] == "]":  # a ] right after [ or [^ is a literal one
                out.append(pattern[i:start + 1])
                i = start + 1
                continue
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _matcher(tokenizer, spec: Spec):
    import llguidance

    try:
        if spec.kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.source, overrides=JSON_OPTIONS)
        elif spec.kind == "grammar":
            grammar = llguidance.grammar_from("gbnf", spec.source)
        else:
            grammar = llguidance.grammar_from("regex", ascii_digits(spec.source))
    except ValueError as e:  # GBNF that does not convert, a schema that is not an object
        raise ConstraintError(f"{spec.param}: {e}", spec.param) from None
    limits = llguidance.LLParserLimits(verbose_errors=False)  # no parser dumps in a client's error message
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
    mask = np.zeros(_words(tokenizer.vocab_size), dtype=np.int32)
    if not matcher.is_error():  # a grammar that can match nothing fails its first mask
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    if matcher.is_error() or not mask.any():
        raise ConstraintError(f"{spec.param}: {_reason(matcher)}", spec.param)
    return matcher


def _reason(matcher) -> str:
    error = matcher.get_error().replace("<non-verbose/>", "").strip()
    if error in ("NoExtension", "NoExtensionBias", ""):
        return "it matches no text"
    return error


def _words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def lltokenizer(tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int]):
    """llguidance's tokenizer from the bundle's tokenizer.json, with each token's bytes worked out here: its own
    reading of tokenizer.json misses byte-level vocabularies whose decoder is a sequence (as transformers' GGUF
    conversion writes SmolLM2's), and would treat 'Ġ' as two bytes instead of a space."""
    import llguidance
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(tokenizer_json)
    backend = HFTokenizer.from_str(json.dumps(without_prefix_space(data)))
    table, special = token_table(data, vocab_size)

    class Vocabulary:
        eos_token_id = eos_ids[0] if eos_ids else None
        bos_token_id = None
        tokens = table
        special_token_ids = special

        def __call__(self, text):
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            return backend.encode(text, add_special_tokens=False).ids

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=vocab_size,
                                  eos_token=list(eos_ids) or None)


def without_prefix_space(data: dict) -> dict:
    """The tokenizer with no space put before a text: llguidance tokenizes pieces of text mid-sentence, where
    SentencePiece's leading "▁" (a Prepend normalizer, Metaspace's prepend_scheme) would add a space."""
    def strip(node):
        if isinstance(node, list):
            return [strip(n) for n in node if not (isinstance(n, dict) and n.get("type") == "Prepend")]
        if not isinstance(node, dict):
            return node
        out = {k: strip(v) for k, v in node.items()}
        if out.get("type") == "Metaspace":
            out["prepend_scheme"], out["add_prefix_space"] = "never", False
        if out.get("type") == "ByteLevel":
            out["add_prefix_space"] = False
        return out
    data = dict(data)
    if isinstance(data.get("normalizer"), dict) and data["normalizer"].get("type") == "Prepend":
        data["normalizer"] = None
    data["normalizer"], data["pre_tokenizer"] = strip(data.get("normalizer")), strip(data.get("pre_tokenizer"))
    return data


def token_table(data: dict, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Each id's bytes (b"" for ids past the vocabulary: padding of the logits), and the special tokens' ids, which
    llguidance marks with a leading 0xff so that no text can spell them."""
    vocab = dict(data["model"].get("vocab", {}))
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    byte_level = "ByteLevel" in json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
    table, special = [b""] * vocab_size, []
    for piece, i in vocab.items():
        if not 0 <= i < vocab_size:
            continue
        token = added.get(piece)
        if token is not None and token.get("special", False):
            table[i] = b"\xff" + piece.encode("utf-8")
            special.append(i)
        elif token is not None:
            table[i] = piece.encode("utf-8")  # added tokens are literal text, outside the byte mapping
        else:
            table[i] = _byte_level(piece) if byte_level else _sentencepiece(piece)
    return table, special


def _byte_level(piece: str) -> bytes:
    table = _unicode_to_byte()
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return piece.encode("utf-8")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's reversible map from bytes to printable characters, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _sentencepiece(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])  # byte fallback
    return piece.replace("\u2581", " ").encode("utf-8")


class Constraint:
    """A compiled constraint; start() gives each generation its own matcher."""

    def __init__(self, matcher, vocab_size: int, spec: Spec):
        self._prototype, self.vocab_size, self.spec = matcher, vocab_size, spec

    def start(self, prompt_length: int) -> Matcher:
        return Matcher(self._prototype.deep_copy(), self.vocab_size, prompt_length)


class Matcher:
    """One generation's place in the grammar, kept in step with the token history it is shown.

    As a logits processor (called with the prompt and the tokens so far) it consumes the tokens it has not seen
    and masks the logits. `ahead` consumes the newest token and computes the next mask on the helper thread, to
    overlap the forward pass. Tokens are only ever appended, never taken back: a rejected draft token is never
    shown to it (edge/generate.py), so nothing needs rolling back."""

    def __init__(self, matcher, vocab_size: int, prompt_length: int):
        self._m, self.vocab_size, self.prompt_length = matcher, vocab_size, prompt_length
        self.consumed = 0  # generated tokens consumed
        self._bits = np.zeros(_words(vocab_size), dtype=np.int32)
        self._mask_at = -1  # the consumed count the bits are for
        self._pending: Future | None = None

    def __call__(self, history: Sequence[int], logits: np.ndarray) -> np.ndarray:
        self.sync(history)
        allowed = self._allowed()
        return np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)

    def sync(self, history: Sequence[int]) -> None:
        new = history[self.prompt_length + self.consumed:]
        if not len(new):
            return
        self._settle()
        if not self._m.consume_tokens([int(t) for t in new]):
            raise ConstraintError(f"the output left the grammar: {_reason(self._m)}")
        self.consumed += len(new)

    def ahead(self, history: Sequence[int]) -> None:
        """Consume the history's new tokens and start computing the next mask on the helper thread."""
        self.sync(history)
        if self._pending is None and self._mask_at != self.consumed:
            self._mask_at = self.consumed
            self._pending = _helper().submit(self._m.unsafe_compute_mask_ptr, self._bits.ctypes.data,
                                             self._bits.nbytes)

    def valid(self, history: Sequence[int], draft: Sequence[int]) -> int:
        """How many of the draft's tokens the grammar takes after the history (the rest need not be verified)."""
        if not draft:
            return 0
        self.sync(history)
        self._settle()
        return self._m.validate_tokens([int(t) for t in draft])

    def forced(self, history: Sequence[int]) -> list[int]:
        """The tokens the grammar forces after the history (a key, a closing quote and colon): the only text that
        can follow, as the tokenizer writes it. Drafted, they are verified like any draft: where the model would
        spell the same text with other tokens, its own choice wins."""
        self.sync(history)
        self._settle()
        return list(self._m.compute_ff_tokens())

    @property
    def finished(self) -> bool:
        """No token but end-of-sequence can follow: the structure is complete."""
        return self._m.is_stopped()

    def _allowed(self) -> np.ndarray:
        self._settle()
        if self._mask_at != self.consumed:
            self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            self._mask_at = self.consumed
        if self._m.is_error():
            raise ConstraintError(f"the grammar cannot continue: {_reason(self._m)}")
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab_size].astype(bool)

    def _settle(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    """The one thread that computes masks ahead (generation runs on one worker thread, so one is enough)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-grammar")
        return _pool
