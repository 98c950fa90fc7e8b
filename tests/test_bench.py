"""`edge bench` reports every figure from fresh processes; the table shows ratios to each peer."""
from __future__ import annotations

import json

from conftest import run_edge

from edge.bench import FIGURES, table


def test_bench_reports_every_figure():
    results = json.loads(run_edge("bench", "demo", "--runs", "2", "--prompt-tokens", "32", "--new-tokens", "16",
                                  "--threads", "1", "--json").stdout)
    figures = results["edge"]
    assert set(FIGURES) <= set(figures)
    for figure in FIGURES:
        assert 0 < figures[figure]["min"] <= figures[figure]["median"] <= figures[figure]["max"]


def test_table_gives_ratios_to_peers():
    one = {f: {"median": 2.0, "min": 1.0, "max": 3.0} for f in FIGURES}
    half = {f: {"median": 1.0, "min": 1.0, "max": 1.0} for f in FIGURES if f != "host_ms_per_token"}
    text = table({"edge": one, "genai": half})
    assert "| decode_tok_s | 2 (1-3) | 1 (1-1) | x2.00 |" in text
    assert "| host_ms_per_token | 2 (1-3) | n/a | n/a |" in text
