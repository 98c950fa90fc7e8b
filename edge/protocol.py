"""OpenAI's chat and completions API: request bodies checked into generation parameters, records shaped into
responses and stream chunks. No model logic: the server hands these to the engine's stream and back."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields that would change the output but are not supported: refused, never silently ignored.
REFUSED = {
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none", "auto"),
    "function_call": lambda v: v not in (None, "none", "auto"),
    "response_format": lambda v: v not in (None, {"type": "text"}),
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


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


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


def parse_chat(body: dict) -> Request:
    _refuse_unsupported(body)
    request = Request("chat", messages=_messages(body.get("messages")), **_common(body))
    request.logprobs = _typed(body, "logprobs", bool, default=False)
    request.top_logprobs = _number(body, "top_logprobs", int, 0, 20, default=0)
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    request.params["max_tokens"] = _max_tokens(body, "max_completion_tokens") or _max_tokens(body, "max_tokens")
    request.params["top_logprobs"] = request.top_logprobs
    return request


def parse_completion(body: dict) -> Request:
    _refuse_unsupported(body)
    request = Request("completion", prompt=_prompt(body.get("prompt")), **_common(body))
    count = _number(body, "logprobs", int, 0, 5, default=None)
    request.logprobs, request.top_logprobs = count is not None, count or 0
    request.params["max_tokens"] = _max_tokens(body, "max_tokens") or 16  # OpenAI's default for completions
    request.params["top_logprobs"] = request.top_logprobs
    return request


def _common(body: dict) -> dict:
    params = {
        "temperature": _number(body, "temperature", float, 0, 2),
        "top_p": _number(body, "top_p", float, 0, 1, low_open=True),
        "top_k": _number(body, "top_k", int, 0, None),
        "min_p": _number(body, "min_p", float, 0, 1),
        "seed": _number(body, "seed", int, None, None),
        "presence_penalty": _number(body, "presence_penalty", float, -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", float, -2, 2),
        "repetition_penalty": _number(body, "repetition_penalty", float, 0, 10, low_open=True),
        "stop": _stop(body.get("stop")),
    }
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage must be a boolean", "stream_options.include_usage")
    return {"params": params, "stream": _typed(body, "stream", bool, default=False), "include_usage": include_usage}


def _refuse_unsupported(body: dict) -> None:
    for name, unsupported in REFUSED.items():
        if name in body and unsupported(body[name]):
            raise APIError(400, f"{name}={body[name]!r} is not supported by this server", name)


def _typed(body: dict, name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise APIError(400, f"{name} must be a {kind.__name__}", name)
    return value


def _number(body: dict, name: str, kind: type, low, high, default: Any = None, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        raise APIError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", name)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"in {'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"{name} must be {bounds}, got {value}", name)
    return kind(value)


def _max_tokens(body: dict, name: str) -> int | None:
    # Beyond the room left in the context is fine: the engine clamps it (finish_reason "length"). Beyond int32 is
    # not a token count but a client bug.
    return _number(body, name, int, 1, 2**31 - 1)


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 16:
        raise APIError(400, "stop must be a string or a list of up to 16 strings", "stop")
    return [s for s in stops if s]


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty list", "messages")
    return [_message(m, i) for i, m in enumerate(value)]


def _message(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object", where)
    role = message.get("role")
    if role not in ROLES:
        if role == "tool":
            raise APIError(400, f"{where}.role 'tool' is not supported (no tool calling)", f"{where}.role")
        raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
    if message.get("tool_calls"):
        raise APIError(400, f"{where}.tool_calls are not supported", f"{where}.tool_calls")
    return {"role": ROLES[role], "content": _content(message.get("content"), where)}


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.content[{j}] must be a text part (images and audio are not supported)",
                               f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return value
    raise APIError(400, "prompt must be a non-empty string, a list of token ids, or a list of one of those", "prompt")


# Responses ------------------------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_logprobs(records, decode, kind: str):
    """OpenAI's logprobs object for these records (chat: a list of entries; completion: parallel lists)."""
    if kind == "chat":
        return {"content": [_chat_entry(r.token, r.logprob, decode, r.top_logprobs) for r in records]}
    tokens = [decode(r.token) for r in records]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [r.logprob for r in records],
            "top_logprobs": [{decode(t): lp for t, lp in r.top_logprobs} for r in records], "text_offset": offsets}


def _chat_entry(token: int, logprob: float, decode, top) -> dict:
    text = decode(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": decode(t), "logprob": lp, "bytes": list(decode(t).encode("utf-8"))}
                             for t, lp in top]}


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
