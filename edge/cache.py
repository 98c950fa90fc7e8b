"""The KV cache: past keys and values of every layer, as the exported graph takes and returns them."""
from __future__ import annotations

import numpy as np


class KVCache:
    """Knows its offset (tokens already seen) and builds the feeds for the next chunk of tokens.

    The optimum graph takes the whole past and returns past + new as `present`; this object swaps them in.
    """

    def __init__(self, spec: dict, num_layers: int, num_kv_heads: int, head_dim: int, dtype=np.float32):
        self.spec = spec  # the manifest's "onnx" section: input and output names
        self.offset = 0
        empty = np.zeros((1, num_kv_heads, 0, head_dim), dtype=dtype)
        self.keys = [empty] * num_layers
        self.values = [empty] * num_layers

    @property
    def output_names(self) -> list[str]:
        spec, layers = self.spec, range(len(self.keys))
        return [spec["logits"]] + [spec[f"present_{kind}"].format(layer=i) for i in layers for kind in ("key", "value")]

    def feeds(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        n, spec = len(tokens), self.spec
        inputs = spec["inputs"]
        feeds = {
            inputs["input_ids"]: tokens.reshape(1, n).astype(np.int64),
            inputs["attention_mask"]: np.ones((1, self.offset + n), dtype=np.int64),
        }
        if inputs.get("position_ids"):
            feeds[inputs["position_ids"]] = np.arange(self.offset, self.offset + n, dtype=np.int64).reshape(1, n)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            feeds[spec["past_key"].format(layer=i)] = k
            feeds[spec["past_value"].format(layer=i)] = v
        return feeds

    def update(self, presents: list[np.ndarray], n: int) -> None:
        self.keys, self.values = presents[0::2], presents[1::2]
        self.offset += n
