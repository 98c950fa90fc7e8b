"""The KV cache: past keys and values of every layer, as the exported graph takes and returns them.

Two kinds, named by the manifest's `onnx.kv`:
- "growing" (optimum's graph): the graph takes the whole past and returns past + new as `present`; the cache
  swaps them in, so each step copies the cache once.
- "shared-buffer" (the fast graph): one preallocated buffer per layer, sized to the chosen context, bound as
  both past and present with onnxruntime's IO binding; GroupQueryAttention writes the new keys in place, so no
  step copies or reallocates the cache.
Both know their offset (tokens already seen) and run the session on the next chunk of tokens, given as the int64
array Model.forward makes of them.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort


class KVCache:
    def __init__(self, spec: dict, num_layers: int, num_kv_heads: int, head_dim: int):
        self.spec = spec  # the manifest's "onnx" section: input and output names
        self.offset = 0
        empty = np.zeros((1, num_kv_heads, 0, head_dim), dtype=np.float32)
        self.keys = [empty] * num_layers
        self.values = [empty] * num_layers
        layers = range(num_layers)  # names built once, not per step
        self.past_names = [(spec["past_key"].format(layer=i), spec["past_value"].format(layer=i)) for i in layers]
        self.output_names = [spec["logits"]] + [spec[f"present_{kind}"].format(layer=i)
                                                for i in layers for kind in ("key", "value")]

    def feeds(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        n, spec = len(tokens), self.spec
        inputs = spec["inputs"]
        feeds = {
            inputs["input_ids"]: tokens.reshape(1, n),
            inputs["attention_mask"]: np.ones((1, self.offset + n), dtype=np.int64),
        }
        if inputs.get("position_ids"):
            feeds[inputs["position_ids"]] = np.arange(self.offset, self.offset + n, dtype=np.int64).reshape(1, n)
        for (key_name, value_name), k, v in zip(self.past_names, self.keys, self.values):
            feeds[key_name], feeds[value_name] = k, v
        return feeds

    def update(self, presents: list[np.ndarray], n: int) -> None:
        self.keys, self.values = presents[0::2], presents[1::2]
        self.offset += n

    def run(self, session: ort.InferenceSession, tokens: np.ndarray) -> np.ndarray:
        """Logits of the chunk (positions x vocab), after appending its keys and values."""
        outputs = session.run(self.output_names, self.feeds(tokens))
        self.update(outputs[1:], len(tokens))
        return outputs[0][0]


class SharedKVCache:
    def __init__(self, session: ort.InferenceSession, spec: dict, num_layers: int, num_kv_heads: int, head_dim: int,
                 capacity: int, vocab_size: int):
        self.spec, self.capacity, self.offset = spec, capacity, 0
        self.binding = session.io_binding()
        self.buffers = []  # [layer][key, value]: each bound as past input and present output alike
        for i in range(num_layers):
            pair = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, num_kv_heads, capacity, head_dim), np.float32))
                    for _ in range(2)]
            for kind, buffer in zip(("key", "value"), pair):
                self.binding.bind_ortvalue_input(spec[f"past_{kind}"].format(layer=i), buffer)
                self.binding.bind_ortvalue_output(spec[f"present_{kind}"].format(layer=i), buffer)
            self.buffers.append(pair)
        self.logits = np.zeros((1, 1, vocab_size), np.float32)  # the bound output's memory, read without a round trip
        self.binding.bind_ortvalue_output(spec["logits"], ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.mask = np.ones((1, capacity), dtype=np.int64)  # views of it are the attention masks: no allocation

    def run(self, session: ort.InferenceSession, tokens: np.ndarray) -> np.ndarray:
        """Logits of the chunk's last position (1 x vocab), after writing its keys and values in place."""
        n = len(tokens)
        if self.offset + n > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens; {self.offset + n} do not fit")
        inputs = self.spec["inputs"]
        self.binding.bind_cpu_input(inputs["input_ids"], tokens.reshape(1, n))
        self.binding.bind_cpu_input(inputs["attention_mask"], self.mask[:, : self.offset + n])
        session.run_with_iobinding(self.binding)
        self.offset += n
        return self.logits[0].copy()  # the bound buffer is overwritten by the next step
