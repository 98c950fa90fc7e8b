"""`load()` ties a verified bundle, a device profile, the tokenizer and the chat template into an Engine."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge import devices
from edge.devices import Profile, read_device
from edge import generate as gen
from edge import fidelity, memory
from edge.bundle import Bundle, BundleError, open_bundle
from edge.chat import ChatTemplate, ChatTemplateError
from edge.model import Model
from edge.sampling import log_softmax
from edge.session import warn_once
from edge.tokenizer import Tokenizer

DEMO = Path(__file__).parent / "demo" / "stories260K"


class Engine:
    """A loaded model that generates text; build it with `edge.load(bundle)`."""

    def __init__(self, bundle: Bundle, profile: Profile, context_length: int | None = None):
        manifest = bundle.manifest
        self.bundle, self.profile = bundle, profile
        self.model = Model(bundle, profile, context_length)
        self.tokenizer = Tokenizer(bundle.file(manifest["tokenizer"]["file"]))
        special = manifest["tokenizer"].get("special_tokens", {})
        self.document_start = self.tokenizer.document_start(special)  # what an empty prompt starts from
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
        """Token ids of a plain prompt (with the tokenizer's special tokens, e.g. BOS) or of chat messages.

        An empty prompt ("" or no ids) starts a new document, as OpenAI's completions do: from BOS, else
        `<|endoftext|>`, else EOS; a model with none of them refuses it (ContextError)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give either a prompt or messages")
        if messages is not None:
            if self.chat_template is None:
                raise ChatTemplateError("this bundle has no chat template; use a plain prompt")
            # The template writes BOS and friends itself, so no special tokens are added (as transformers does).
            return self.tokenizer.encode(self.chat_template.render(messages), add_special_tokens=False)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if ids:
            return ids
        if self.document_start is None:
            raise gen.ContextError("the prompt is empty and this model's tokenizer has no BOS, <|endoftext|> or EOS "
                                   "token to start a document from; give a prompt")
        return [self.document_start]

    def stream(self, prompt=None, messages=None, **params) -> Iterator[gen.Record]:
        ids = self.encode(prompt, messages)
        return gen.stream(self.model, self.tokenizer, ids, self.params(**params), self.eos_ids)

    def generate(self, prompt=None, messages=None, **params) -> str:
        ids = self.encode(prompt, messages)
        return gen.generate(self.model, self.tokenizer, ids, self.params(**params), self.eos_ids)

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced log-probabilities of every vocabulary entry at every position: row i is the
        distribution of the token after ids[:i + 1] ([len(ids) - 1, vocab], float32)."""
        self._check_window(ids)
        return log_softmax(self.model.score(list(ids)))

    def logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """Log-probability of each token after the first given the ones before it (for perplexity)."""
        return self.score(ids)[np.arange(len(ids) - 1), list(ids[1:])]

    def perplexity(self, text: str) -> float:
        return float(np.exp(-self.logprobs(self.encode(text)).mean()))

    def evaluate(self, text: str | Sequence[int], reference: Engine | None = None, window: int | None = None) -> dict:
        """edge.fidelity's figures on a text (or token ids): perplexity, and against a reference bundle of the
        same model the perplexity ratio, top-1 agreement and mean KL. Texts longer than the context (or than
        `window`) are scored in consecutive windows, each from a fresh context."""
        ids = self.encode(text) if isinstance(text, str) else [int(t) for t in text]
        if reference is not None and reference.encode(text if isinstance(text, str) else ids) != ids:
            raise ValueError("the reference bundle's tokenizer splits the text differently: compare bundles of the "
                             "same model")
        size = min(window or self.context_length, self.context_length,
                   reference.context_length if reference else self.context_length)
        windows = fidelity.windows(ids, size)
        got = (block for w in windows for block in self.model.scored_rows(w))
        want = (block for w in windows for block in reference.model.scored_rows(w)) if reference else None
        return fidelity.measure(got, want)

    def _check_window(self, ids: Sequence[int]) -> None:
        if len(ids) < 2:
            raise ValueError("scoring needs at least 2 tokens")
        if len(ids) > self.context_length:
            raise gen.ContextError(f"{len(ids)} tokens do not fit the context of {self.context_length}; score them "
                                   f"in windows (Engine.evaluate does)")


def resolve(bundle: str | Path) -> Path:
    """A bundle folder, or the word "demo" for the small story model shipped with edge-llm."""
    return DEMO if str(bundle) == "demo" else Path(bundle)


def load(bundle: str | Path, profile: str | Path | Profile = "auto", context_length: int | None = None,
         verify: str = "changed", check_memory: bool = True) -> Engine:
    """Verify a bundle and load it under a device profile.

    profile: "auto" (detect the board), a profile name, a .toml path, or a Profile.
    context_length: tokens of context to plan for; default the profile's, capped by the model's.
    verify: "changed" re-hashes files whose size or mtime changed since the last full check; "all"; "none".
    check_memory: refuse, with the numbers, a model that will not fit the budget or the free memory.
    """
    path = resolve(bundle)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    opened = open_bundle(path, verify=verify)
    device = read_device()
    choice = devices.resolve(profile, device, tuple(ort.get_available_providers()))
    context = memory.planned_context(opened.manifest, choice.profile, context_length)
    if check_memory:
        memory.check(memory.estimate(opened, context), choice.profile, device)
    warn_target(opened.manifest, choice.profile)
    return Engine(opened, choice.profile, context)


def warn_target(manifest: dict, profile: Profile) -> None:
    """A bundle quantized for another board (its block size or quantization) still runs: say so, once."""
    target = manifest.get("target") or {}
    if not target or target.get("profile") == profile.name:
        return
    warn_once(f"this bundle was exported for {target['profile']}; this board uses profile {profile.name}")
