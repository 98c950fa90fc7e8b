"""The exported graph behind one interface: `forward(ids, state) -> logits`, one adapter per graph kind.

Knowledge of the graph kinds (named by the manifest's `onnx.kv`) lives here and nowhere else in the runtime:
- FastDecoder ("shared-buffer", our fused graph): fixed KV buffers sized to the context, bound as both past and
  present with onnxruntime's IO binding; GroupQueryAttention writes the new keys in place, so no step copies or
  reallocates the cache, and continues from any offset it is given (a trimmed or restored prefix). It returns the
  logits of the last `logits_to_keep` positions (1 for a step or a prefill chunk; more to verify a draft; bundles
  before that input always return the last one).
- OptimumDecoder ("growing", optimum's graph): takes the whole past and returns past + new as `present`; returns
  logits for every position.
Each owns its session and says what it needs in memory (edge/memory.py asks).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from edge import fidelity
from edge.bundle import Bundle
from edge.cache import KVState
from edge.devices import Profile
from edge.session import make_session, require_onnxruntime


class Decoder:
    kind = ""  # the manifest's onnx.kv
    every_position = False  # forward returns logits for every position fed, not only the last
    prefill_chunk = 64  # prompt tokens per forward pass: bounds the activations, and the (chunk x vocab) logits
    # of a graph that returns every position's

    def __init__(self, session: ort.InferenceSession, spec: dict, shape: dict, context_length: int):
        self.session, self.spec, self.shape = session, spec, shape  # spec: the manifest's "onnx" section
        self.context_length = context_length  # the positions a state holds at most
        self.providers = session.get_providers()  # what the session really uses, not what was asked
        inputs = spec["inputs"]
        self.ids_name, self.mask_name = inputs["input_ids"], inputs["attention_mask"]
        self.keep_name = inputs.get("logits_to_keep")  # None: optimum's graph, or a fast one from before speculation
        layers = range(shape["num_layers"])  # names built once, not per step
        self.past_names = [(spec["past_key"].format(layer=i), spec["past_value"].format(layer=i)) for i in layers]
        self.present_names = [(spec["present_key"].format(layer=i), spec["present_value"].format(layer=i))
                              for i in layers]

    def forward(self, ids: Sequence[int] | np.ndarray, state: KVState, keep: int = 1) -> np.ndarray:
        """Logits after the ids, which are appended to the state: [keep, vocab] for the last `keep` positions (at
        least; [len(ids), vocab] where every_position)."""
        raise NotImplementedError

    @property
    def verifies(self) -> bool:
        """Whether forward can return the logits of several positions (speculative decoding needs them)."""
        return self.every_position

    def new_state(self) -> KVState:
        raise NotImplementedError

    def prefill(self, ids: Sequence[int], state: KVState) -> np.ndarray:
        """Logits of the last of the ids after feeding them in chunks of prefill_chunk."""
        tokens = np.asarray(ids, dtype=np.int64)
        if not len(tokens):
            raise ValueError("nothing to prefill")
        for start in range(0, len(tokens), self.prefill_chunk):
            logits = self.forward(tokens[start:start + self.prefill_chunk], state)
        return logits[-1]

    def scored_rows(self, ids: Sequence[int], split: int = 1):
        """(logits, targets) blocks predicting ids[split:], teacher-forced from a fresh state (edge/fidelity.py)."""
        state = self.new_state()
        return fidelity.scored_rows(lambda tokens: self.forward(tokens, state), ids, not self.every_position, split)

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Logits predicting ids[1:], one row per position 0 .. n-2 (teacher forcing)."""
        return np.concatenate([logits for logits, _ in self.scored_rows(ids)])

    @classmethod
    def kv_bytes(cls, shape: dict, context: int) -> int:
        """Memory of one state at `context` tokens (fixed buffers: one, bound as past and present)."""
        return 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * context * 4

    @classmethod
    def logits_rows(cls) -> int:
        """The most logits rows one forward pass returns."""
        return cls.prefill_chunk if cls.every_position else 1

    def _state(self, capacity: int | None) -> KVState:
        s = self.shape
        return KVState(s["num_layers"], s["num_kv_heads"], s["head_dim"], capacity)


class FastDecoder(Decoder):
    kind = "shared-buffer"
    prefill_chunk = 128  # only the last row's logits come back: twice optimum's chunk prefilled SmolLM2 11% faster

    def __init__(self, session, spec, shape, context_length):
        super().__init__(session, spec, shape, context_length)
        self.mask = np.ones((1, context_length), dtype=np.int64)  # views of it are the attention masks
        self.keeps = {}  # logits_to_keep -> (its input array, a logits buffer of that many rows)

    @property
    def verifies(self) -> bool:
        return self.keep_name is not None

    def new_state(self) -> KVState:
        return self._state(self.context_length)

    def forward(self, ids, state: KVState, keep: int = 1) -> np.ndarray:
        tokens = np.asarray(ids, dtype=np.int64)
        n = len(tokens)
        if not 1 <= keep <= n or (keep > 1 and not self.verifies):
            raise ValueError(f"cannot return the logits of {keep} of {n} positions from this graph")
        state.room(n)
        binding, kept = state.bound or self._bind(state)
        if keep != kept:  # a verification pass, or the step after one: other rows, another buffer
            self._bind_logits(binding, keep)
            state.bound = (binding, keep)
        binding.bind_cpu_input(self.ids_name, tokens.reshape(1, n))
        binding.bind_cpu_input(self.mask_name, self.mask[:, : state.offset + n])
        self.session.run_with_iobinding(binding)
        state.append(tokens)
        return self.keeps[keep][1][0].copy()  # the bound buffer is overwritten by the next step

    def _bind_logits(self, binding, keep: int) -> None:
        """Bind a logits buffer of `keep` rows read without a round trip (made once per row count), and the input
        that asks the graph for that many."""
        if keep not in self.keeps:
            self.keeps[keep] = (np.array([keep], np.int64), np.zeros((1, keep, self.shape["vocab_size"]), np.float32))
        count, logits = self.keeps[keep]
        binding.bind_ortvalue_output(self.spec["logits"], ort.OrtValue.ortvalue_from_numpy(logits))
        if self.keep_name:
            binding.bind_ortvalue_input(self.keep_name, ort.OrtValue.ortvalue_from_numpy(count))

    def _bind(self, state: KVState):
        """The state's buffers bound once as past and present alike (an OrtValue made from a numpy array shares its
        memory on the CPU), and the one-row logits buffer."""
        binding = self.session.io_binding()
        for (past_k, past_v), (present_k, present_v), k, v in zip(self.past_names, self.present_names,
                                                                 state.keys, state.values):
            for past, present, array in ((past_k, present_k, k), (past_v, present_v, v)):
                value = ort.OrtValue.ortvalue_from_numpy(array)
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
        self._bind_logits(binding, 1)
        state.bound = (binding, 1)
        return state.bound

class OptimumDecoder(Decoder):
    kind = "growing"
    every_position = True

    def __init__(self, session, spec, shape, context_length):
        super().__init__(session, spec, shape, context_length)
        self.positions_name = spec["inputs"].get("position_ids")
        self.output_names = [spec["logits"]] + [name for pair in self.present_names for name in pair]

    def new_state(self) -> KVState:
        return self._state(None)

    def feeds(self, tokens: np.ndarray, state: KVState) -> dict[str, np.ndarray]:
        n, offset = len(tokens), state.offset
        feeds = {self.ids_name: tokens.reshape(1, n), self.mask_name: np.ones((1, offset + n), dtype=np.int64)}
        if self.positions_name:
            feeds[self.positions_name] = np.arange(offset, offset + n, dtype=np.int64).reshape(1, n)
        if self.keep_name:  # the exporter's probes feed the fast graph this way too (export/calibrate.py)
            feeds[self.keep_name] = np.array([1], np.int64)
        for (key_name, value_name), k, v in zip(self.past_names, state.keys, state.values):
            feeds[key_name], feeds[value_name] = k, v
        return feeds

    def forward(self, ids, state: KVState, keep: int = 1) -> np.ndarray:
        tokens = np.asarray(ids, dtype=np.int64)
        if state.offset + len(tokens) > self.context_length:
            raise ValueError(f"the context holds {self.context_length} tokens; {state.offset + len(tokens)} do not fit")
        outputs = self.session.run(self.output_names, self.feeds(tokens, state))
        state.append(tokens, outputs[1::2], outputs[2::2])
        return outputs[0][0]

    @classmethod
    def kv_bytes(cls, shape: dict, context: int) -> int:
        return 2 * super().kv_bytes(shape, context)  # past in and present out are both alive during a step


KINDS = {cls.kind: cls for cls in (FastDecoder, OptimumDecoder)}


def kind_of(spec: dict) -> type[Decoder]:
    """The adapter for a manifest's onnx section (bundles before the fast graph have no `kv`: optimum's)."""
    kind = spec.get("kv", "growing")
    if kind not in KINDS:
        raise ValueError(f"unknown graph kind onnx.kv={kind!r}; this edge-llm knows {', '.join(KINDS)}: upgrade it")
    return KINDS[kind]


def open_decoder(bundle: Bundle, profile: Profile, context_length: int | None = None) -> Decoder:
    """The bundle's graph in a session made for the profile, planned for a context (capped by the model's)."""
    shape, spec = bundle.manifest["model"], bundle.manifest["onnx"]
    context = min(context_length or shape["context_length"], shape["context_length"])
    adapter = kind_of(spec)
    require_onnxruntime(spec.get("min_onnxruntime"), bundle.path)
    session = make_session(bundle.file(spec["file"]), profile, bundle.model_sha256())
    return adapter(session, spec, shape, context)


def for_session(session: ort.InferenceSession, spec: dict, shape: dict, context_length: int) -> Decoder:
    """An adapter over a session made elsewhere (the exporter scores raw graphs exactly as the runtime runs them)."""
    return kind_of(spec)(session, spec, shape, context_length)
