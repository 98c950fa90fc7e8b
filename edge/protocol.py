"""OpenAI's chat and completions API: request bodies checked into generation parameters, records shaped into
responses and stream chunks. No model logic: the server hands these to the engine's stream and back."""
from __future__ import annotations

import json
import math
import reprlib  # clients' values in messages, bounded in length and depth however big or nested
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from edge.constraint import ConstraintError, spec_from

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields that would change the output but are not supported: refused, never silently ignored.
REFUSED = {
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none", "auto"),
    "function_call": lambda v: v not in (None, "none", "auto"),
    "logit_bias": lambda v: bool(v),
    "echo": lambda v: bool(v),
    "suffix": lambda v: bool(v),
    "prediction": lambda v: v is not None,
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "reasoning_effort": lambda v: v is not None,
    "web_search_options": lambda v: v is not None,
}
# Every other field is accepted; those that are neither parsed below nor refused above (model, user, metadata,
# store, service_tier, parallel_tool_calls, and fields OpenAI does not define) are ignored, as llama.cpp does.


INT64 = 2**63  # seeds are int64 in OpenAI's API
INT32 = 2**31  # beyond this no count of tokens is meant
MAX_DIGITS = 40  # longer integers are refused while parsing, before Python spends time converting them


class APIError(Exception):
    """An error answered with OpenAI's error body. `code` is one of the codes OpenAI sends (client libraries
    branch on them, e.g. "context_length_exceeded"), or None where OpenAI has none either."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def decode_body(body: bytes) -> dict:
    """A request body as a JSON object, or a 400 for anything else: bad UTF-8 or JSON, nesting too deep for the
    parser, integers of more digits than any field takes, and NaN, Infinity or numbers that overflow to it (JSON
    has none of these, and a NaN would slip past every range check)."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float,
                          parse_int=_short_int)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or a number refused below
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_type")
    return data


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is longer than any field takes")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of the range of a double")
    return value


@dataclass
class Request:
    """What the engine needs from one API request."""

    kind: str  # "chat" or "completion"
    messages: list[dict] | None = None  # chat: messages with string content
    prompt: str | list[int] | None = None  # completion: text or token ids
    params: dict = field(default_factory=dict)  # GenerationParams fields
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    logprobs: bool = False
    top_logprobs: int = 0
    cache_prompt: bool = True  # llama.cpp's field: false neither reuses nor keeps a cached prefix for this request


def parse_chat(body: dict) -> Request:
    _refuse_unsupported(body)
    request = Request("chat", messages=_messages(body.get("messages")), **_common(body))
    request.logprobs = _typed(body, "logprobs", bool, default=False)
    request.top_logprobs = _number(body, "top_logprobs", int, 0, 20, default=0)
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", code="invalid_value")
    request.params["max_tokens"] = _max_tokens(body, "max_completion_tokens") or _max_tokens(body, "max_tokens")
    request.params["top_logprobs"] = request.top_logprobs
    request.params["logprobs"] = request.logprobs  # not asked for: not computed
    return request


def parse_completion(body: dict) -> Request:
    _refuse_unsupported(body)
    request = Request("completion", prompt=_prompt(body.get("prompt")), **_common(body))
    count = _number(body, "logprobs", int, 0, 5, default=None)
    request.logprobs, request.top_logprobs = count is not None, count or 0
    request.params["max_tokens"] = _max_tokens(body, "max_tokens") or 16  # OpenAI's default for completions
    request.params["top_logprobs"] = request.top_logprobs
    request.params["logprobs"] = request.logprobs  # not asked for: not computed
    return request


def _common(body: dict) -> dict:
    params = {
        "temperature": _number(body, "temperature", float, 0, 2),
        "top_p": _number(body, "top_p", float, 0, 1, low_open=True),
        "top_k": _number(body, "top_k", int, 0, INT32 - 1),
        "min_p": _number(body, "min_p", float, 0, 1),
        "seed": _number(body, "seed", int, -INT64, INT64 - 1),
        "presence_penalty": _number(body, "presence_penalty", float, -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", float, -2, 2),
        "repetition_penalty": _number(body, "repetition_penalty", float, 0, 10, low_open=True),
        "stop": _stop(body.get("stop")),
        "speculate": _typed(body, "speculate", bool),
        "constraint": _constraint(body),
    }
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options", code="invalid_type")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage must be a boolean", "stream_options.include_usage",
                       code="invalid_type")
    return {"params": params, "stream": _typed(body, "stream", bool, default=False), "include_usage": include_usage,
            "cache_prompt": _typed(body, "cache_prompt", bool, default=True)}


def _constraint(body: dict):
    """OpenAI's response_format, or llama.cpp's grammar (GBNF) or json_schema (a bare schema), or regex: the
    shape of the field is checked here, the schema or grammar itself when the engine compiles it."""
    try:
        return spec_from(body.get("response_format"), body.get("grammar"), body.get("json_schema"), body.get("regex"))
    except ConstraintError as e:
        raise APIError(400, str(e), e.param, code="invalid_value") from None


def _refuse_unsupported(body: dict) -> None:
    for name, unsupported in REFUSED.items():
        if name in body and unsupported(body[name]):
            raise APIError(400, f"{name}={reprlib.repr(body[name])} is not supported by this server", name,
                           code="unsupported_value")


def _typed(body: dict, name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise APIError(400, f"{name} must be a {kind.__name__}", name, code="invalid_type")
    return value


def _number(body: dict, name: str, kind: type, low, high, default: Any = None, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        raise APIError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", name, code="invalid_type")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"in {'(' if low_open else '['}{low}, {high}]"
        code = f"{'integer' if kind is int else 'decimal'}_{'below_min' if too_low else 'above_max'}_value"
        raise APIError(400, f"{name} must be {bounds}, got {reprlib.repr(value)}", name, code=code)
    return kind(value)


def _max_tokens(body: dict, name: str) -> int | None:
    # Beyond the room left in the context is fine: the engine clamps it (finish_reason "length"). Beyond int32 is
    # not a token count but a client bug.
    return _number(body, name, int, 1, INT32 - 1)


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", "stop", code="invalid_type")
    if len(stops) > 16:
        raise APIError(400, f"stop holds {len(stops)} strings; at most 16", "stop", code="array_above_max_length")
    return [s for s in stops if s]


def _messages(value) -> list[dict]:
    if value is None:
        raise APIError(400, "messages is required", "messages", code="missing_required_parameter")
    if not isinstance(value, list):
        raise APIError(400, "messages must be a non-empty list", "messages", code="invalid_type")
    if not value:
        raise APIError(400, "messages must be a non-empty list", "messages", code="empty_array")
    return [_message(m, i) for i, m in enumerate(value)]


def _message(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object", where, code="invalid_type")
    role = message.get("role")
    if role not in ROLES:
        if role == "tool":
            raise APIError(400, f"{where}.role 'tool' is not supported (no tool calling)", f"{where}.role",
                           code="unsupported_value")
        raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role", code="invalid_value")
    if message.get("tool_calls"):
        raise APIError(400, f"{where}.tool_calls are not supported", f"{where}.tool_calls", code="unsupported_value")
    return {"role": ROLES[role], "content": _content(message.get("content"), where)}


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.content[{j}] must be a text part (images and audio are not supported)",
                               f"{where}.content", code="unsupported_value")
            texts.append(part["text"])
        return "\n".join(texts)  # as llama.cpp's server joins them: parts are paragraphs, not word fragments
    raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content",
                   code="invalid_type")


def _prompt(value) -> str | list[int]:
    """Text or token ids; empty ones start a new document (see Engine.encode)."""
    if value is None:
        raise APIError(400, "prompt is required", "prompt", code="missing_required_parameter")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return value
    raise APIError(400, "prompt must be a string, a list of token ids, or a list of one of those", "prompt",
                   code="invalid_type")


# Responses ------------------------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def token_logprobs(records, kind: str):
    """OpenAI's logprobs object for these records (chat: a list of entries; completion: parallel lists)."""
    if kind == "chat":
        return {"content": [_chat_entry(r) for r in records]}
    offsets, at = [], 0
    for r in records:
        offsets.append(at)
        at += len(r.piece)
    return {"tokens": [r.piece for r in records], "token_logprobs": [r.logprob for r in records],
            "top_logprobs": [{piece: lp for piece, (_, lp) in zip(r.top_pieces, r.top_logprobs)} for r in records],
            "text_offset": offsets}


def _chat_entry(record) -> dict:
    return {"token": record.piece, "logprob": record.logprob, "bytes": list(record.piece.encode("utf-8")),
            "top_logprobs": [{"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}
                             for piece, (_, lp) in zip(record.top_pieces, record.top_logprobs)]}


def response(kind: str, rid: str, model: str, text: str, finish: str | None, logprobs, use: dict) -> dict:
    choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": use}


def chunk(kind: str, rid: str, model: str, text: str | None, finish: str | None, logprobs=None,
          role: bool = False) -> dict:
    choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, model: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": use}
