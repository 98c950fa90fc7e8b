"""Text to token ids and back with the bundle's tokenizer.json, and a detokenizer for streaming."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

DOCUMENT_SEPARATOR = "<|endoftext|>"  # GPT-2's, Qwen's, SmolLM's: between documents in training
REPLACEMENT = "\ufffd"  # what a decoder emits for bytes that do not yet form a whole UTF-8 character


class Tokenizer:
    def __init__(self, file: Path):
        self.backend = HFTokenizer.from_file(str(file))
        anchor = self.backend.encode("a", add_special_tokens=False).ids
        self._anchor = anchor[-1:]  # a plain token to decode others after, so they keep their leading space
        self._anchor_text = self.backend.decode(self._anchor, skip_special_tokens=False)

    def document_start(self, special_tokens: dict[str, str]) -> int | None:
        """The token a text starts from when there is no text: BOS; else `<|endoftext|>`, the document separator
        OpenAI's completions start an empty prompt from; else EOS (which ends the document before, in training)."""
        names = (special_tokens.get("bos_token"), DOCUMENT_SEPARATOR, special_tokens.get("eos_token"))
        ids = [self.backend.token_to_id(name) for name in names if name]
        return next((i for i in ids if i is not None), None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def decode_one(self, token: int) -> str:
        """One token's text as it reads mid-sentence (for logprobs), special tokens included: decoded after an
        anchor token, since decoders strip a leading space (SentencePiece) at the start of a text."""
        both = self.backend.decode(self._anchor + [token], skip_special_tokens=False)
        if both.startswith(self._anchor_text):
            return both[len(self._anchor_text):]
        return self.backend.decode([token], skip_special_tokens=False)

    def detokenizer(self, context: Sequence[int]) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, context)


class StreamingDetokenizer:
    """Turns tokens into text as they come, never splitting a UTF-8 character.

    Decodes a short window that starts a few tokens back, so that tokenizers which drop or add a leading space
    depending on what came before (SentencePiece's "▁") give the same text as decoding everything at once.
    The window starts inside the prompt, so the first generated word gets its space.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids = list(context[-6:])
        self.prefix = 0  # window start: text before read_at is already out
        self.read_at = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end comes out as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix:self.read_at])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read_at = self.read_at, len(self.ids)
        return text[len(done):]
