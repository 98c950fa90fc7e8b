"""The exported decoder behind a plain interface: feed tokens through a KV cache, get logits back."""
from __future__ import annotations

import numpy as np

from edge import fidelity
from edge.devices import Profile
from edge.bundle import Bundle
from edge.cache import KVCache, SharedKVCache
from edge.session import make_session, require_onnxruntime


class Model:
    def __init__(self, bundle: Bundle, profile: Profile, context_length: int | None = None):
        self.shape = bundle.manifest["model"]  # layers, heads, kv heads, head dim, vocab, context length
        self.spec = bundle.manifest["onnx"]
        # The context planned for (and checked against memory); never more than the model was trained for.
        self.context_length = min(context_length or self.shape["context_length"], self.shape["context_length"])
        file = self.spec["file"]
        require_onnxruntime(self.spec.get("min_onnxruntime"), bundle.path)
        self.session = make_session(bundle.file(file), profile, bundle.manifest["files"][file]["sha256"])
        self.providers = self.session.get_providers()  # what the session really uses, not what was asked

    @property
    def last_only(self) -> bool:
        """The graph returns logits for the last position of each chunk only (the fast graph)."""
        return self.spec.get("logits_positions") == "last"

    def new_cache(self) -> KVCache | SharedKVCache:
        s = self.shape
        if self.spec.get("kv") == "shared-buffer":
            return SharedKVCache(self.session, self.spec, s["num_layers"], s["num_kv_heads"], s["head_dim"],
                                 self.context_length, s["vocab_size"])
        return KVCache(self.spec, s["num_layers"], s["num_kv_heads"], s["head_dim"])

    def forward(self, cache: KVCache | SharedKVCache, tokens: np.ndarray) -> np.ndarray:
        """Logits for the tokens, which are appended to the cache: one row per token, or only the last row when
        the graph computes the last position alone."""
        return cache.run(self.session, np.asarray(tokens, dtype=np.int64))

    def scored_rows(self, ids):
        """(logits, targets) blocks predicting ids[1:], teacher-forced from a fresh cache (edge/fidelity.py)."""
        cache = self.new_cache()
        return fidelity.scored_rows(lambda tokens: self.forward(cache, tokens), ids, self.last_only)

    def score(self, ids) -> np.ndarray:
        """Logits predicting ids[1:], one row per position 0 .. n-2 (teacher forcing)."""
        return np.concatenate([logits for logits, _ in self.scored_rows(ids)])
