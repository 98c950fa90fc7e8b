"""The prefix cache: snapshots of recent requests' keys and values, so that a prompt sharing a prefix with one of them
(a long system prompt every request of an app sends, the history a chat client re-sends each turn) prefills only
what follows that prefix.

Entries are whole token runs, least recently used first out, within a byte budget the device profile sets (and the
memory check counts). A file of entries can be written at shutdown and read at start, verified against the bundle,
so that a board's first request after boot is warm. The file is numpy's .npz, read without pickle.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.cache import KVState, Snapshot, common_prefix

MIN_TOKENS = 16  # shorter runs are not worth a snapshot: prefilling them costs less than keeping them
FORMAT = 1  # of the cache file


class PrefixCacheFileError(ValueError):
    """A prefix-cache file that is not for this bundle, or not a cache file at all."""


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes  # the most bytes the snapshots may hold together
        self.entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()  # least recently used first

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.entries.values())

    def best(self, ids: Sequence[int]) -> tuple[int, Snapshot | None]:
        """The entry sharing the longest prefix with ids, and how many tokens of it to reuse: at most all but the
        last of ids, whose logits the generation needs."""
        found, length = None, 0
        for tokens, snapshot in self.entries.items():
            n = min(common_prefix(tokens, ids), len(ids) - 1)
            if n > length:
                found, length = snapshot, n
        if found is not None:
            self.entries.move_to_end(found.tokens)
        return length, found

    def prepare(self, state: KVState, ids: Sequence[int]) -> None:
        """Put into the state the longest prefix of ids that it or an entry holds."""
        live = min(common_prefix(state.tokens, ids), len(ids) - 1)
        n, snapshot = self.best(ids)
        if snapshot is not None and n > live:
            state.restore(snapshot, n)
        else:
            state.trim(live)

    def remember(self, state: KVState) -> None:
        """Keep a snapshot of what the state holds, unless an entry covers it already or it is too short."""
        tokens = tuple(state.tokens)
        if len(tokens) < MIN_TOKENS:
            return
        for held in list(self.entries):
            if held[:len(tokens)] == tokens:  # an entry holds all of it already
                self.entries.move_to_end(held)
                return
        self.add(state.snapshot())

    def add(self, snapshot: Snapshot) -> None:
        if snapshot.nbytes > self.budget:
            return
        for held in [t for t in self.entries if snapshot.tokens[:len(t)] == t]:
            del self.entries[held]  # a prefix of the new entry: the new one serves everything it served
        self.entries[snapshot.tokens] = snapshot
        while self.nbytes > self.budget:
            self.entries.popitem(last=False)

    def save(self, path: Path, identity: dict) -> int:
        """Write the entries to a file, whole or not at all; returns how many."""
        arrays = {"meta": np.frombuffer(json.dumps({"format": FORMAT, **identity}).encode(), np.uint8)}
        for i, snapshot in enumerate(self.entries.values()):
            arrays[f"tokens_{i}"] = np.array(snapshot.tokens, np.int64)
            arrays.update({f"key_{i}_{j}": k for j, k in enumerate(snapshot.keys)})
            arrays.update({f"value_{i}_{j}": v for j, v in enumerate(snapshot.values)})
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        partial.replace(path)
        return len(self.entries)

    def load(self, path: Path, identity: dict, layers: int) -> int:
        """Add the entries of a file written by save() for this same bundle; returns how many."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                if meta != {"format": FORMAT, **identity}:
                    raise PrefixCacheFileError(f"{path} was written for another bundle, graph or context "
                                               f"({meta.get('model_sha256', '?')[:12]}, not "
                                               f"{identity['model_sha256'][:12]}); not used")
                count = sum(1 for name in data.files if name.startswith("tokens_"))
                for i in range(count):
                    self.add(Snapshot(tuple(int(t) for t in data[f"tokens_{i}"]),
                                      tuple(data[f"key_{i}_{j}"] for j in range(layers)),
                                      tuple(data[f"value_{i}_{j}"] for j in range(layers))))
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            if isinstance(e, PrefixCacheFileError):
                raise
            raise PrefixCacheFileError(f"{path} is not a readable prefix-cache file ({e}); not used") from e
        return count
