"""benchmarks/compare.py: the peers run beside edge-llm from the same checkpoint (never part of the runtime)."""
from __future__ import annotations

import importlib.util

import compare  # benchmarks/, put on the path by conftest.py

from edge.bench import alternate, edge_runner


def test_compare_runs_the_optimum_peer(exports, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "CACHE", tmp_path / "peers")  # not the user's ~/.cache
    checkpoint = exports.checkpoint("qwen2.5")  # optimum's ORTModel mis-sizes the cache of an explicit head_dim
    peers = compare.runners(str(checkpoint), ["optimum", "llamacpp"], threads=1)
    llamacpp_here = all(importlib.util.find_spec(m) for m in ("llama_cpp", "gguf"))
    assert set(peers) == {"optimum"} | ({"llamacpp"} if llamacpp_here else set())  # else skipped with a reason
    results = alternate({"edge": edge_runner(str(exports.bundle("qwen2.5")), 1), **peers}, 16, 8, 1)
    for engine in ("edge", "optimum"):
        assert results[engine]["decode_tok_s"]["median"] > 0 and results[engine]["peak_rss_mb"]["median"] > 0
