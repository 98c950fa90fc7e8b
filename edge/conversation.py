"""A conversation that remembers the token ids the model saw, so that turn N prefills only turn N's tokens and the
template's joining tokens: the answer's own tokens stay as they were generated (re-tokenizing its text could
split it differently and miss the cache), and the template renders only what is new.

When the conversation outgrows the context, `overflow` decides: "refuse" (the default) raises ContextLengthError
with the numbers and keeps the conversation as it was; "drop-oldest" drops the oldest exchanges after the system
prompt until the turn fits, leaving room for max_tokens (at most half the context).
"""
from __future__ import annotations

from collections.abc import Iterator

from edge import generate as gen
from edge.chat import ChatTemplateError

OVERFLOW = ("refuse", "drop-oldest")


class Conversation:
    def __init__(self, engine, system: str | None = None, overflow: str = "refuse"):
        if engine.chat_template is None:
            raise ChatTemplateError("this bundle has no chat template, so it cannot hold a conversation")
        if overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, not {overflow!r}")
        self.engine, self.overflow = engine, overflow
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.ids: list[int] = []  # what the model has seen: the last turn's prompt and its generated tokens
        self.text = ""  # the text those ids stand for, as the template renders it ("" when unknown)
        self.last: gen.Record | None = None  # the last turn's last record (cached_tokens: what it did not prefill)

    def say(self, content: str, **params) -> Iterator[gen.Record]:
        """The answer to a user message, as records; the exchange is kept once the answer is complete."""
        messages = self.messages + [{"role": "user", "content": content}]
        parameters = self.engine.params(**params)
        messages, ids, text = self._fit(messages, parameters.max_tokens)
        return self._turn(messages, ids, text, params)

    def reply(self, content: str, **params) -> str:
        return "".join(record.text for record in self.say(content, **params))

    def _turn(self, messages: list[dict], ids: list[int], text: str, params: dict) -> Iterator[gen.Record]:
        records = []
        for record in self.engine.stream(ids, **params):
            records.append(record)
            yield record
        answer = "".join(r.text for r in records)
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.ids = ids + [r.token for r in records]
        self.last = records[-1] if records else None
        # Only an answer that ended on an end-of-turn token is known to read back as exactly its tokens.
        ended = bool(records) and records[-1].token in self.engine.eos_ids
        self.text = text + answer + records[-1].piece if ended else ""

    def _ids(self, messages: list[dict], continued: bool = True) -> tuple[list[int], str]:
        """Token ids and text of the prompt for these messages: the kept ids plus the template's new text, where
        the new rendering continues the kept text; else the whole rendering tokenized afresh."""
        engine = self.engine
        text = engine.chat_template.render(messages)
        if continued and self.text and text.startswith(self.text):
            suffix = text[len(self.text):]
            return self.ids + engine.tokenizer.encode(suffix, add_special_tokens=False), text
        return engine.encode(messages=messages), text

    def _fit(self, messages: list[dict], max_tokens: int) -> tuple[list[dict], list[int], str]:
        context = self.engine.context_length
        room = min(max_tokens, context // 2)
        ids, text = self._ids(messages)
        while len(ids) + room > context and self.overflow == "drop-oldest" and self._droppable(messages):
            first = 1 if messages[0]["role"] == "system" else 0
            messages = messages[:first] + messages[first + 2:]  # one user turn and its answer
            ids, text = self._ids(messages, continued=False)  # the kept ids no longer start the prompt
        if len(ids) >= context:
            raise gen.ContextLengthError(
                f"the conversation has {len(ids)} tokens but the context holds {context}; start a new one, or "
                f"let it drop its oldest turns (overflow='drop-oldest', edge chat --overflow drop-oldest)")
        return messages, ids, text

    @staticmethod
    def _droppable(messages: list[dict]) -> bool:
        first = 1 if messages and messages[0]["role"] == "system" else 0
        return len(messages) - first > 1  # more than the new user message
