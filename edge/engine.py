"""`load()` ties a verified bundle, a device profile, the tokenizer and the chat template into an Engine."""
from __future__ import annotations

import queue
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
from edge.constraint import ConstraintError, Grammars, Spec, spec_from
from edge.conversation import Conversation
from edge.decoder import open_decoder
from edge.prefix import PrefixCache
from edge.sampling import log_softmax
from edge.session import warn_once
from edge.tokenizer import Tokenizer
from edge.worker import DONE, Job, Worker

DEMO = Path(__file__).parent / "demo" / "stories260K"


class Engine:
    """A loaded model that generates text; build it with `edge.load(bundle)`."""

    def __init__(self, bundle: Bundle, profile: Profile, context_length: int | None = None, prefix_cache_mb: float = 0,
                 speculate: bool | None = None):
        manifest = bundle.manifest
        self.bundle, self.profile = bundle, profile
        self.decoder = open_decoder(bundle, profile, context_length)
        self.tokenizer = Tokenizer(bundle.file(manifest["tokenizer"]["file"]))
        special = manifest["tokenizer"].get("special_tokens", {})
        self.document_start = self.tokenizer.document_start(special)  # what an empty prompt starts from
        template = manifest.get("chat_template")
        self.chat_template = ChatTemplate(bundle.file(template).read_text(encoding="utf-8"), special) if template else None
        self.eos_ids = frozenset(manifest["generation"]["eos_token_ids"])
        self.defaults = dict(manifest["generation"].get("defaults", {}))
        if speculate is not None:  # the engine's default; a request may still say otherwise
            self.defaults["speculate"] = speculate
        if speculate and not self.decoder.verifies:
            warn_once(f"{bundle.path} was exported before speculative decoding (its graph returns one position's "
                      f"logits): it decodes one token per pass; export it again to speculate")
        prefix = PrefixCache(int(prefix_cache_mb * memory.MB)) if prefix_cache_mb > 0 else None
        self.worker = Worker(self.decoder, self.tokenizer, self.eos_ids, prefix)  # the one thread that generates
        self.grammars = Grammars(bundle.file(manifest["tokenizer"]["file"]), self.decoder.shape["vocab_size"],
                                 self.eos_ids)

    @property
    def context_length(self) -> int:
        return self.decoder.context_length

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.worker.prefix

    def params(self, response_format=None, grammar=None, json_schema=None, regex=None, constraint=None,
               **overrides) -> gen.GenerationParams:
        """Generation parameters: the bundle's defaults, then these. The output can be constrained by one of
        response_format (OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema":
        ...}}), json_schema (a schema), grammar (GBNF, as llama.cpp takes it, or Lark), regex, or constraint (a
        Spec, as the server parses one); one that cannot be built raises ConstraintError with the reason
        (compiling takes milliseconds, once per spec)."""
        spec = spec_from(response_format, grammar, json_schema, regex)
        if spec is not None and constraint is not None:
            raise ConstraintError("give either constraint or one of response_format, grammar, json_schema and regex")
        spec = spec or constraint
        if isinstance(spec, Spec):
            spec = self.grammars.compile(spec)
        return gen.GenerationParams.with_defaults(self.defaults, constraint=spec, **overrides)

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

    def stream(self, prompt=None, messages=None, cache_prompt: bool = True, **params) -> Iterator[gen.Record]:
        """Records of the generation, made by the engine's worker thread (calls from several threads take turns).
        cache_prompt=False neither reuses nor keeps a prefix for this request."""
        ids = self.encode(prompt, messages)
        results: queue.Queue = queue.Queue()
        job = self.submit(ids, self.params(**params), results.put, cache_prompt)
        return Stream(job, results)

    def generate(self, prompt=None, messages=None, **params) -> str:
        return "".join(record.text for record in self.stream(prompt, messages, **params))

    def submit(self, ids: Sequence[int], params: gen.GenerationParams, sink, cache_prompt: bool = True,
               max_queue: int | None = None) -> Job:
        """Queue a generation on the worker; sink receives its records, an exception if one ends it, then DONE
        (edge/worker.py). The server's way in; raises ContextError or BusyError at once."""
        return self.worker.submit(ids, params, sink, cache_prompt, max_queue)

    def conversation(self, system: str | None = None, overflow: str = "refuse") -> Conversation:
        """A chat that keeps the token ids the model saw, so that each turn prefills only its own tokens."""
        return Conversation(self, system, overflow)

    def save_prefix_cache(self, path: str | Path) -> int:
        """Write the prefix cache's entries to a file (read back by load_prefix_cache); returns how many."""
        if self.prefix_cache is None:
            return 0
        return self.worker.call(lambda: self.prefix_cache.save(Path(path), self._identity()))

    def load_prefix_cache(self, path: str | Path) -> int:
        """Add the entries of a file written for this same bundle; PrefixCacheFileError for any other file."""
        if self.prefix_cache is None:
            return 0
        layers = self.decoder.shape["num_layers"]
        return self.worker.call(lambda: self.prefix_cache.load(Path(path), self._identity(), layers))

    def _identity(self) -> dict:
        """What a prefix-cache file must have been written for: this graph and these weights, of this shape."""
        return {"model_sha256": self.bundle.model_sha256(), "kind": self.decoder.kind,
                "shape": {k: self.decoder.shape[k] for k in ("num_layers", "num_kv_heads", "head_dim")}}

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced log-probabilities of every vocabulary entry at every position: row i is the
        distribution of the token after ids[:i + 1] ([len(ids) - 1, vocab], float32)."""
        self._check_window(ids)
        return log_softmax(self.decoder.score(list(ids)))

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
        got = (block for w in windows for block in self.decoder.scored_rows(w))
        want = (block for w in windows for block in reference.decoder.scored_rows(w)) if reference else None
        return fidelity.measure(got, want)

    def _check_window(self, ids: Sequence[int]) -> None:
        if len(ids) < 2:
            raise ValueError("scoring needs at least 2 tokens")
        if len(ids) > self.context_length:
            raise gen.ContextError(f"{len(ids)} tokens do not fit the context of {self.context_length}; score them "
                                   f"in windows (Engine.evaluate does)")


class Stream:
    """A job's records as the worker makes them. A consumer that stops early (close(), break, or dropping the
    stream, read or not) cancels the rest of the generation."""

    def __init__(self, job: Job, results: queue.Queue):
        self.job, self.results, self.done = job, results, False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> gen.Record:
        if self.done:
            raise StopIteration
        item = self.results.get()
        if item is DONE or isinstance(item, Exception):
            self.close()
            if item is DONE:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        self.done = True
        self.job.cancel.set()

    def __del__(self):
        self.job.cancel.set()


def resolve(bundle: str | Path) -> Path:
    """A bundle folder, or the word "demo" for the small story model shipped with edge-llm."""
    return DEMO if str(bundle) == "demo" else Path(bundle)


def load(bundle: str | Path, profile: str | Path | Profile = "auto", context_length: int | None = None,
         verify: str = "changed", check_memory: bool = True, prefix_cache_mb: float | None = None,
         speculate: bool | None = None) -> Engine:
    """Verify a bundle and load it under a device profile.

    profile: "auto" (detect the board), a profile name, a .toml path, or a Profile.
    context_length: tokens of context to plan for; default the profile's, capped by the model's.
    verify: "changed" re-hashes files whose size or mtime changed since the last full check; "all"; "none".
    check_memory: refuse, with the numbers, a model that will not fit the budget or the free memory.
    prefix_cache_mb: memory for snapshots of recent prompts (edge/prefix.py); 0 turns the cache off; None takes the
    profile's, and turns it off where the model fits only without it.
    speculate: draft from the prompt and verify several tokens per pass (edge/draft.py) unless a call says
    otherwise; None keeps GenerationParams' default.
    """
    path = resolve(bundle)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    opened = open_bundle(path, verify=verify)
    device = read_device()
    choice = devices.resolve(profile, device, tuple(ort.get_available_providers()))
    context = memory.planned_context(opened.manifest, choice.profile, context_length)
    prefix = choice.profile.memory.prefix_cache_mb if prefix_cache_mb is None else prefix_cache_mb
    if prefix_cache_mb is not None and prefix_cache_mb < 0:
        raise ValueError(f"prefix_cache_mb must be >= 0 (0 turns it off), not {prefix_cache_mb}")
    if check_memory:
        prefix = fitted_prefix_cache(opened, context, prefix, prefix_cache_mb is None, choice.profile, device)
    warn_target(opened.manifest, choice.profile)
    return Engine(opened, choice.profile, context, prefix, speculate)


def fitted_prefix_cache(bundle: Bundle, context: int, prefix_mb: float, optional: bool, profile: Profile,
                        device) -> float:
    """Check the model and its prefix cache against the memory; a prefix cache the user did not ask for is given up
    (with a note) where the model fits only without it."""
    try:
        memory.check(memory.estimate(bundle, context, prefix_mb), profile, device)
        return prefix_mb
    except memory.MemoryBudgetError:
        if not (optional and prefix_mb):
            raise
    memory.check(memory.estimate(bundle, context), profile, device)
    warn_once(f"no room for the profile's {prefix_mb} MB prefix cache: it is off (--prefix-cache MB to ask for one)")
    return 0


def warn_target(manifest: dict, profile: Profile) -> None:
    """A bundle quantized for another board (its block size or quantization) still runs: say so, once."""
    target = manifest.get("target") or {}
    if not target or target.get("profile") == profile.name:
        return
    warn_once(f"this bundle was exported for {target['profile']}; this board uses profile {profile.name}")
