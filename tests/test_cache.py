"""The KV state (edge/cache.py) against the real graphs: trimming, snapshots and restores leave it exactly as
feeding the same tokens into a fresh state would, on the fast graph's fixed buffers and optimum's growing arrays."""
from __future__ import annotations

import numpy as np
import pytest

import edge
from edge.cache import CacheFullError, common_prefix

GRAPHS = [("qwen3", "auto"), ("qwen3", "optimum"), ("gemma2", "auto")]  # fixed buffers, growing arrays, a window


def fresh(decoder, ids):
    return decoder.prefill(ids, decoder.new_state())


@pytest.fixture(scope="module", params=GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def decoder(request, exports):
    name, graph = request.param
    return edge.load(exports.bundle(name, graph=graph), context_length=64).decoder


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(3, 400, size=n).tolist()


def test_trim_then_continue_equals_a_fresh_prefill(decoder):
    ids, other = tokens(30), tokens(12, seed=1)
    state = decoder.new_state()
    decoder.prefill(ids, state)
    state.trim(18)
    assert state.offset == 18 and state.tokens == ids[:18]
    got = decoder.prefill(other, state)
    np.testing.assert_allclose(got, fresh(decoder, ids[:18] + other), atol=1e-4, rtol=1e-4)


def test_snapshot_and_restore_of_a_prefix(decoder):
    ids = tokens(40)
    state = decoder.new_state()
    decoder.prefill(ids[:25], state)
    snapshot = state.snapshot(20)
    assert snapshot.tokens == tuple(ids[:20]) and snapshot.keys[0].shape[2] == 20
    decoder.prefill(tokens(10, seed=2), state)  # the state moves on; the snapshot is a copy and must not
    other = decoder.new_state()
    other.restore(snapshot, 15)
    assert other.tokens == ids[:15]
    np.testing.assert_allclose(decoder.prefill(ids[15:], other), fresh(decoder, ids), atol=1e-4, rtol=1e-4)
    state.restore(snapshot)  # into a state that held other tokens
    np.testing.assert_allclose(decoder.prefill(ids[20:], state), fresh(decoder, ids), atol=1e-4, rtol=1e-4)


def test_bounds_are_checked(decoder):
    state = decoder.new_state()
    decoder.prefill(tokens(10), state)
    with pytest.raises(ValueError, match="cannot trim"):
        state.trim(11)
    with pytest.raises(ValueError, match="cannot snapshot"):
        state.snapshot(11)
    with pytest.raises(ValueError, match="cannot restore"):
        decoder.new_state().restore(state.snapshot(5), 6)
    assert 2 * state.snapshot(5).nbytes == state.snapshot(10).nbytes > 0


def test_a_full_fixed_state_is_refused_before_the_graph_runs(exports):
    decoder = edge.load(exports.bundle("qwen3"), context_length=32).decoder
    state = decoder.new_state()
    decoder.prefill(tokens(30), state)
    with pytest.raises(CacheFullError, match="holds 32 tokens"):
        decoder.forward(tokens(3), state)
    assert state.offset == 30  # nothing was written


@pytest.mark.parametrize("a, b, n", [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2),
                                     ([1, 2, 3], [1, 5, 3], 1), ([4], [1], 0)])
def test_common_prefix(a, b, n):
    assert common_prefix(a, b) == n
