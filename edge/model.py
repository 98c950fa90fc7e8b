"""The exported decoder behind a plain interface: feed tokens through a KV cache, get logits back."""
from __future__ import annotations

import numpy as np

from devices import Profile
from edge.bundle import Bundle
from edge.cache import KVCache
from edge.session import make_session


class Model:
    def __init__(self, bundle: Bundle, profile: Profile, context_length: int | None = None):
        self.shape = bundle.manifest["model"]  # layers, heads, kv heads, head dim, vocab, context length
        self.spec = bundle.manifest["onnx"]
        # The context planned for (and checked against memory); never more than the model was trained for.
        self.context_length = min(context_length or self.shape["context_length"], self.shape["context_length"])
        file = self.spec["file"]
        self.session = make_session(bundle.file(file), profile, bundle.manifest["files"][file]["sha256"])
        self.providers = self.session.get_providers()  # what the session really uses, not what was asked

    def new_cache(self) -> KVCache:
        s = self.shape
        return KVCache(self.spec, s["num_layers"], s["num_kv_heads"], s["head_dim"])

    def forward(self, cache: KVCache, tokens: np.ndarray) -> np.ndarray:
        """Logits (len(tokens), vocab) for the tokens, which are appended to the cache."""
        outputs = self.session.run(cache.output_names, cache.feeds(tokens))
        cache.update(outputs[1:], len(tokens))
        return outputs[0][0]
