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


def test_profile_ops_accounts_for_every_weight_byte_once_per_token():
    from edge.budget import kv_bytes_per_token
    from edge.engine import resolve

    demo = resolve("demo")
    budget = json.loads(run_edge("bench", "demo", "--profile-ops", "--prompt-tokens", "16", "--new-tokens", "8",
                                 "--threads", "1", "--json").stdout)
    manifest = json.loads((demo / "manifest.json").read_text())
    parts = budget["parts"]
    assert {"matmul attn_qkv", "matmul attn_out", "matmul mlp_in", "matmul mlp_down", "matmul lm_head"} <= set(parts)
    # every part was timed, and the profiler's own cost per kernel comes off each, never below zero
    assert all(p["profiled_ms"] > 0 and p["nodes"] > 0 and 0 <= p["ms"] <= p["profiled_ms"] for p in parts.values())
    assert budget["nodes"] == sum(p["nodes"] for p in parts.values()) > 100  # optimum's graph: hundreds of nodes
    # A decode step reads each weight once: the bytes counted per token are the model file's, less the embedding
    # table (one row of it is read) and the graph's structure, plus the cache.
    weights = budget["bytes_per_token"] - kv_bytes_per_token(manifest["model"], 16 + 8 / 2)
    table_bytes = manifest["model"]["vocab_size"] * manifest["model"]["hidden_size"] * 4
    assert 0.9 * ((demo / "model.onnx").stat().st_size - table_bytes) < weights < (demo / "model.onnx").stat().st_size
    assert budget["kernels_ms"] == pytest.approx(sum(p["ms"] for p in parts.values()))


def test_kernel_times_count_only_the_timed_steps(tmp_path):
    from edge.budget import kernel_times

    def run(ts, node_us):
        events = [{"cat": "Session", "name": "model_run", "ts": ts, "dur": 100}]
        return events + [{"cat": "Node", "name": f"{node}_kernel_time", "ts": ts + 1, "dur": us,
                          "args": {"op_name": "MatMulNBits"}} for node, us in node_us.items()]
    prefill = run(0, {"/q_proj/MatMul": 90})
    steps = run(200, {"/q_proj/MatMul": 10, "/lm_head/MatMul": 4})
    steps += run(400, {"/q_proj/MatMul": 20, "/lm_head/MatMul": 6})
    (tmp_path / "profile.json").write_text(json.dumps(prefill + steps))
    per_node, ops, run_us = kernel_times(tmp_path / "profile.json", 2)
    assert per_node == {"/q_proj/MatMul": 15, "/lm_head/MatMul": 5}  # the prefill's 90 left out
    assert run_us == 100
    assert ops["/lm_head/MatMul"] == "MatMulNBits"
    with pytest.raises(RuntimeError, match="fewer than the 4 steps"):
        kernel_times(tmp_path / "profile.json", 4)


@pytest.mark.parametrize("op, node, expected", [
    ("MatMulNBits", "/model.layers.0.self_attn.qkv_proj/MatMul_Q4", "matmul attn_qkv"),
    ("MatMul", "/model/layers.0/mlp/down_proj/MatMul", "matmul mlp_down"),
    ("MatMulNBits", "/lm_head/MatMul_Q8", "matmul lm_head"),
    ("GroupQueryAttention", "/model.layers.0.self_attn/GroupQueryAttention", "attention"),
    ("SkipSimplifiedLayerNormalization", "/model.layers.1/input_layernorm", "norms"),
    ("GatherBlockQuantized", "embedding_table", "embedding"),
    ("Reshape", "embedding_rows", "other nodes"),
    ("Gather", "/model/embed_tokens/Gather", "embedding"),
    ("Sigmoid", "/Sigmoid_15", "other nodes"),
])
def test_nodes_fall_into_the_parts_of_a_step(op, node, expected):
    from edge.budget import part

    assert part(op, node) == expected
