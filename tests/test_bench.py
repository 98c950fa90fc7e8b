"""`edge bench` reports every figure from fresh processes; the table shows ratios to each peer."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import run_edge

from edge.bench import FIGURES, table


def test_bench_reports_every_figure():
    results = json.loads(run_edge("bench", "demo", "--runs", "2", "--prompt-tokens", "32", "--new-tokens", "16",
                                  "--threads", "1", "--json").stdout)
    figures = results["edge"]
    assert set(FIGURES) <= set(figures)
    low, high = ({f: figures[f][end] for f in FIGURES} for end in ("min", "max"))
    # Each run's figures hang together: prefill speed is the 32-token prompt over the time to the first token
    # (so the fastest prefill is the shortest wait), and the host's share of a decode step is less than the step.
    assert high["prefill_tok_s"] == pytest.approx(32 / low["ttft_s"])
    assert low["prefill_tok_s"] == pytest.approx(32 / high["ttft_s"])
    assert 0 < high["host_ms_per_token"] < 1000 / low["decode_tok_s"]
    assert low["load_s"] > 0 and low["decode_tok_s"] > 0
    assert low["peak_rss_mb"] > 30 and high["peak_rss_mb"] < 500  # an interpreter with onnxruntime, a 1 MB model


def test_table_gives_ratios_to_peers():
    one = {f: {"median": 2.0, "min": 1.0, "max": 3.0} for f in FIGURES}
    half = {f: {"median": 1.0, "min": 1.0, "max": 1.0} for f in FIGURES if f != "host_ms_per_token"}
    text = table({"edge": one, "genai": half})
    assert "| decode_tok_s | 2 (1-3) | 1 (1-1) | x2.00 |" in text
    assert "| host_ms_per_token | 2 (1-3) | n/a | n/a |" in text


def test_compare_runs_the_optimum_peer(exports, tmp_path, monkeypatch):
    import edge.peers
    from edge.bench import alternate, edge_runner
    from edge.peers import runners

    monkeypatch.setattr(edge.peers, "CACHE", tmp_path / "peers")  # not the user's ~/.cache
    checkpoint = exports.checkpoint("qwen2.5")  # optimum's ORTModel mis-sizes the cache of an explicit head_dim
    peers = runners(str(checkpoint), ["optimum", "llamacpp"], threads=1)
    llamacpp_here = all(importlib.util.find_spec(m) for m in ("llama_cpp", "gguf"))
    assert set(peers) == {"optimum"} | ({"llamacpp"} if llamacpp_here else set())  # else skipped with a reason
    results = alternate({"edge": edge_runner(str(exports.bundle("qwen2.5")), 1), **peers}, 16, 8, 1)
    for engine in ("edge", "optimum"):
        assert results[engine]["decode_tok_s"]["median"] > 0 and results[engine]["peak_rss_mb"]["median"] > 0
