"""`edge bench` reports every figure from fresh processes; the table shows ratios to each peer."""
from __future__ import annotations

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
