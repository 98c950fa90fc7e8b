"""`load()` ties a verified bundle, a device profile, the tokenizer and the chat template into an Engine."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from devices import Profile, load_profile
from edge import generate as gen
from edge.bundle import Bundle, BundleError, open_bundle
from edge.chat import ChatTemplate, ChatTemplateError
from edge.model import Model
from edge.sampling import log_softmax
from edge.tokenizer import Tokenizer

DEMO = Path(__file__).parent / "demo" / "stories260K"


class Engine:
    """A loaded model that generates text; build it with `edge.load(bundle)`."""

    def __init__(self, bundle: Bundle, profile: Profile):
        manifest = bundle.manifest
        self.bundle, self.profile = bundle, profile
        self.model = Model(bundle, profile)
        self.tokenizer = Tokenizer(bundle.file(manifest["tokenizer"]["file"]))
        special = manifest["tokenizer"].get("special_tokens", {})
        template = manifest.get("chat_template")
        self.chat_template = ChatTemplate(bundle.file(template).read_text(encoding="utf-8"), special) if template else None
        self.eos_ids = frozenset(manifest["generation"]["eos_token_ids"])
        self.defaults = manifest["generation"].get("defaults", {})

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def params(self, **overrides) -> gen.GenerationParams:
        return gen.GenerationParams.with_defaults(self.defaults, **overrides)

    def encode(self, prompt: str | Sequence[int] | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a plain prompt (with the tokenizer's special tokens, e.g. BOS) or of chat messages."""
        if (prompt is None) == (messages is None):
            raise ValueError("give either a prompt or messages")
        if messages is not None:
            if self.chat_template is None:
                raise ChatTemplateError("this bundle has no chat template; use a plain prompt")
            # The template writes BOS and friends itself, so no special tokens are added (as transformers does).
            return self.tokenizer.encode(self.chat_template.render(messages), add_special_tokens=False)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def stream(self, prompt=None, messages=None, **params) -> Iterator[gen.Record]:
        ids = self.encode(prompt, messages)
        return gen.stream(self.model, self.tokenizer, ids, self.params(**params), self.eos_ids)

    def generate(self, prompt=None, messages=None, **params) -> str:
        return "".join(record.text for record in self.stream(prompt, messages, **params))

    def logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """Log-probability of each token after the first given the ones before it (for perplexity)."""
        logits = self.model.forward(self.model.new_cache(), np.asarray(ids, dtype=np.int64))
        return log_softmax(logits[:-1])[np.arange(len(ids) - 1), ids[1:]]

    def perplexity(self, text: str) -> float:
        return float(np.exp(-self.logprobs(self.encode(text)).mean()))


def resolve(bundle: str | Path) -> Path:
    """A bundle folder, or the word "demo" for the small story model shipped with edge-llm."""
    return DEMO if str(bundle) == "demo" else Path(bundle)


def load(bundle: str | Path, profile: str | Path | Profile = "auto", verify: str = "changed") -> Engine:
    """Verify a bundle (see `edge.bundle.open_bundle`) and load it under a device profile."""
    path = resolve(bundle)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    return Engine(open_bundle(path, verify=verify), profile)
