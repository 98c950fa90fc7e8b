"""The KV state: past keys and values of every layer for the tokens seen so far, as plain numpy arrays.

It runs nothing: a decoder adapter (edge/decoder.py) reads and writes it. Two layouts, chosen by the adapter:
- fixed: one preallocated [1, kv_heads, capacity, head_dim] buffer per layer and kind, written in place by the
  graph (the fast graph binds the same memory as past and present); positions past `offset` are garbage.
- growing: arrays exactly `offset` long, replaced by the graph's `present` outputs after every step (optimum's).
Either way the state knows which tokens it holds, so that a prefix of it can be kept (trim), copied out
(snapshot) and put back (restore): what the prefix cache and conversations are made of.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class CacheFullError(ValueError):
    """More tokens than the state's capacity (the context the engine planned for)."""


@dataclass(frozen=True)
class Snapshot:
    """A copy of the keys and values of a run of tokens, detached from any state."""

    tokens: tuple[int, ...]  # the tokens whose keys and values these are, from position 0
    keys: tuple[np.ndarray, ...]  # per layer, [1, kv_heads, len(tokens), head_dim]
    values: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)


class KVState:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int | None = None):
        self.capacity = capacity  # fixed buffers of this many positions, or None for growing arrays
        length = capacity if capacity is not None else 0
        self.keys = [np.zeros((1, num_kv_heads, length, head_dim), np.float32) for _ in range(num_layers)]
        self.values = [np.zeros((1, num_kv_heads, length, head_dim), np.float32) for _ in range(num_layers)]
        self.tokens: list[int] = []  # what the keys and values at positions 0 .. offset-1 belong to
        self.bound = None  # the adapter's handle on these buffers (onnxruntime's IO binding), made on first use

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def fixed(self) -> bool:
        return self.capacity is not None

    @property
    def nbytes(self) -> int:
        """Memory the state holds now (fixed buffers: all of it, used or not)."""
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def room(self, n: int) -> None:
        """Refuse n more tokens that would not fit, before the graph writes past the buffers."""
        if self.fixed and self.offset + n > self.capacity:
            raise CacheFullError(f"the KV cache holds {self.capacity} tokens; {self.offset + n} do not fit")

    def append(self, tokens: Sequence[int], keys=None, values=None) -> None:
        """Note that the graph has written the tokens' keys and values (growing: hand over the new arrays)."""
        self.tokens.extend(int(t) for t in tokens)
        if keys is not None:
            self.keys, self.values = list(keys), list(values)

    def trim(self, n: int) -> None:
        """Keep the first n tokens only: the next token goes to position n."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot trim a state of {self.offset} tokens to {n}")
        del self.tokens[n:]
        if not self.fixed:
            self.keys = [k[:, :, :n] for k in self.keys]
            self.values = [v[:, :, :n] for v in self.values]

    def snapshot(self, n: int | None = None) -> Snapshot:
        """A copy of the first n tokens' keys and values (all of them by default)."""
        n = self.offset if n is None else n
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot snapshot {n} tokens of a state of {self.offset}")
        # .copy(), never ascontiguousarray: with one KV head the slice is contiguous already, and would stay a view
        copy = lambda arrays: tuple(a[:, :, :n].copy() for a in arrays)  # noqa: E731
        return Snapshot(tuple(self.tokens[:n]), copy(self.keys), copy(self.values))

    def restore(self, snapshot: Snapshot, n: int | None = None) -> None:
        """Replace the state with the first n tokens of a snapshot (all of them by default)."""
        n = len(snapshot.tokens) if n is None else n
        if not 0 <= n <= len(snapshot.tokens):
            raise ValueError(f"cannot restore {n} tokens from a snapshot of {len(snapshot.tokens)}")
        if len(snapshot.keys) != len(self.keys) or snapshot.keys[0].shape[1::2] != self.keys[0].shape[1::2]:
            raise ValueError("the snapshot is of another model's shape")
        if self.fixed:
            if n > self.capacity:
                raise CacheFullError(f"the KV cache holds {self.capacity} tokens; a snapshot of {n} does not fit")
            for mine, theirs in zip(self.keys + self.values, snapshot.keys + snapshot.values):
                mine[:, :, :n] = theirs[:, :, :n]
        else:  # the graph never writes into its past inputs, so views of the snapshot are safe to feed
            self.keys = [k[:, :, :n] for k in snapshot.keys]
            self.values = [v[:, :, :n] for v in snapshot.values]
        self.tokens = list(snapshot.tokens[:n])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.flatnonzero(x != y)
    return int(differ[0]) if len(differ) else n
