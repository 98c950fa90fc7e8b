"""`edge bench --profile-ops`: where one decode step's time goes, part by part, against the bytes each part reads.

Measured in this process, under the bundle's device profile:
- a plain session gives the step as the runtime runs it (`forward`, with IO binding): the total to explain;
- a profiled session (onnxruntime's profiler) gives each node's kernel time. The profiler reads high: it adds a few
  microseconds to every kernel it times, which on a 135M model's 300 nodes is a fifth of the step;
- a chain of trivial nodes (one hidden-state row through Sigmoid), run plainly and profiled, measures both what
  onnxruntime spends per node outside its kernel and what the profiler adds per kernel. Each part's kernel time is
  corrected by the latter; the former, times the node count, is onnxruntime's overhead between nodes.
What remains of the plain step is our call into onnxruntime (IO binding, Python) and noise. Host work outside the
graph (sampling, detokenizing, records) is the engine's own figure from edge/bench.py.

Bytes are what each part must read from memory per token: its initializers in the optimized graph (4-bit weights,
scales, zero points), the embedding's one row, and for attention the keys and values of the past. Divided by the
part's time they give the bandwidth it reached, to set beside the machine's (read_bandwidth). Reading the graph
needs the `onnx` package, which the runtime does not install.
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from edge.presets import roles

MATMULS = {"MatMulNBits", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "Gemm"}
ATTENTION = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "RotaryEmbedding"}
PART_ORDER = ("matmul attn_qkv", "matmul attn_out", "matmul mlp_in", "matmul mlp_down", "matmul lm_head",
              "matmul other", "attention", "norms", "embedding", "other nodes")


def part(op_type: str, node: str) -> str:
    """Which part of the step a node belongs to, from its op and the names both graph kinds write."""
    if op_type in MATMULS:
        return f"matmul {roles(node) or 'other'}"
    if op_type in ATTENTION:
        return "attention"
    if "LayerNormalization" in op_type:
        return "norms"
    if op_type.startswith("Gather") and "embed" in node:
        return "embedding"
    return "other nodes"


def node_bytes(model_file: Path, vocab: int) -> dict[str, int]:
    """Bytes of the initializers each node reads per token; an embedding gather reads one row of its table and
    attention none (kv_bytes_per_token counts the cache it reads)."""
    try:
        import onnx
    except ImportError:
        raise RuntimeError("edge bench --profile-ops reads the graph's weights with the onnx package, which the "
                           "runtime does not install: pip install onnx") from None

    model = onnx.load(str(model_file), load_external_data=False)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) * itemsize(t.data_type).itemsize
             for t in model.graph.initializer}
    reads = {}
    for node in model.graph.node:
        total = sum(sizes.get(name, 0) for name in node.input)
        kind = part(node.op_type, node.name)
        # attention's tables (rotary cos/sin) are read one position's row at a time: its bytes are the cache's
        reads[node.name] = total // vocab if kind == "embedding" else 0 if kind == "attention" else total
    return reads


def kv_bytes_per_token(shape: dict, past: float) -> float:
    """Keys and values attention reads at an average past length (fp32 cache)."""
    return 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * past * 4


def kernel_times(profile_file: Path, steps: int) -> tuple[dict[str, float], dict[str, str], float]:
    """Each node's median kernel µs over the last `steps` runs of the profile, each node's op type, and the median
    µs of those runs as profiled. Medians, because a shared machine's stalls hit a few steps hard."""
    events = json.loads(Path(profile_file).read_text(encoding="utf-8"))
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")[-steps:]
    if len(runs) < steps:
        raise RuntimeError(f"the profile holds {len(runs)} runs, fewer than the {steps} steps timed")
    durations: dict[str, list] = defaultdict(list)
    ops = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0][0]:
            node = e["name"][: -len("_kernel_time")]
            durations[node].append(e["dur"])
            ops[node] = e.get("args", {}).get("op_name", "")
    medians = {node: float(np.median(us)) for node, us in durations.items()}
    return medians, ops, float(np.median([dur for _, dur in runs]))


def _decode(decoder, prompt: list[int], steps: int) -> list[float]:
    """Seconds of each greedy step after prefilling the prompt, as the runtime steps (forward with IO binding)."""
    state = decoder.new_state()
    token = int(np.argmax(decoder.prefill(prompt, state)))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        token = int(np.argmax(decoder.forward([token], state)))
        times.append(time.perf_counter() - started)
    return times


def measure(bundle_path: str, profile_name: str = "auto", threads: int = 0, prompt_tokens: int = 128,
            new_tokens: int = 128, rounds: int = 5) -> dict:
    """The budget of one decode step of a fast- or optimum-graph bundle: each part's kernel ms (corrected for the
    profiler), bytes and GB/s, onnxruntime's overhead between nodes, the step's wall time (median over `rounds` plain
    runs) and the engine's host ms."""
    from edge.bench import measure as engine_run
    from edge.bundle import open_bundle
    from edge.decoder import for_session
    from edge.devices import resolve
    from edge.session import make_profiled_session, make_session

    profile = resolve(profile_name).profile
    if threads:
        profile = profile.with_threads(threads)
    bundle = open_bundle(bundle_path)
    shape, spec = bundle.manifest["model"], bundle.manifest["onnx"]
    model_file = bundle.file(spec["file"])
    context = prompt_tokens + new_tokens + 8
    prompt = np.random.default_rng(0).integers(3, min(shape["vocab_size"], 30000), size=prompt_tokens).tolist()
    plain = for_session(make_session(model_file, profile), spec, shape, context)
    step_s = float(np.median([t for _ in range(rounds) for t in _decode(plain, prompt, new_tokens)]))
    del plain
    with tempfile.TemporaryDirectory() as folder:
        session, optimized = make_profiled_session(model_file, profile, Path(folder))
        _decode(for_session(session, spec, shape, context), prompt, new_tokens)
        per_node, ops, profiled_us = kernel_times(Path(session.end_profiling()), new_tokens)
        reads = node_bytes(optimized, shape["vocab_size"])
    dispatch_us, inflation_us = node_overheads(profile, shape["hidden_size"])
    parts: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "profiled_ms": 0.0, "bytes": 0, "nodes": 0})
    for node, us in per_node.items():
        figure = parts[part(ops[node], node)]
        figure["profiled_ms"] += us / 1000
        figure["ms"] += max(us - inflation_us, 0) / 1000
        figure["bytes"] += reads.get(node, 0)
        figure["nodes"] += 1
    # the cache is read by the attention op, or in optimum's graph by its unfused q.k and p.v MatMuls
    reader = "attention" if "attention" in parts else "matmul other"
    parts[reader]["bytes"] += int(kv_bytes_per_token(shape, prompt_tokens + new_tokens / 2))
    nodes = sum(p["nodes"] for p in parts.values())
    kernels_ms, between_ms = sum(p["ms"] for p in parts.values()), nodes * dispatch_us / 1000
    host_ms = engine_run(bundle_path, prompt_tokens, new_tokens, threads, profile_name)["host_ms_per_token"]
    return {"parts": {name: dict(parts[name]) for name in PART_ORDER if name in parts},
            "kernels_ms": kernels_ms, "between_nodes_ms": between_ms, "step_ms": 1000 * step_s,
            "call_ms": 1000 * step_s - kernels_ms - between_ms, "host_ms": host_ms,
            "profiled_step_ms": profiled_us / 1000, "dispatch_us_per_node": dispatch_us,
            "profiler_us_per_kernel": inflation_us, "bytes_per_token": sum(p["bytes"] for p in parts.values()),
            "read_gb_s": read_bandwidth(profile.cpu.intra_op_threads or 2), "threads": profile.cpu.intra_op_threads,
            "nodes": nodes, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}


def node_overheads(profile, width: int, length: int = 200, runs: int = 300) -> tuple[float, float]:
    """(µs onnxruntime spends per node beyond a trivial kernel, µs its profiler adds to each kernel's time), from
    a chain of `length` Sigmoid nodes over one [1, width] row, run plainly and profiled under the profile."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edge.session import session_options

    names = ["x"] + [f"y{i}" for i in range(length)]
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", [a], [b], name=b) for a, b in zip(names, names[1:])], "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    feed = {"x": np.zeros((1, width), np.float32)}
    with tempfile.TemporaryDirectory() as folder:
        timings = []
        for profiled in (False, True):
            options = session_options(profile)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
            options.enable_profiling, options.profile_file_prefix = profiled, str(Path(folder) / "chain")
            chain = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            for _ in range(runs // 10):
                chain.run(None, feed)
            started = time.perf_counter()
            for _ in range(runs):
                chain.run(None, feed)
            timings.append(1e6 * (time.perf_counter() - started) / runs / length)
        per_node, _, _ = kernel_times(Path(chain.end_profiling()), runs)
    dispatch = timings[0]
    return dispatch, max(float(np.mean(list(per_node.values()))) - dispatch, 0.0)


def read_bandwidth(threads: int = 2, megabytes: int = 1024, passes: int = 5) -> float:
    """GB/s read by `threads` threads together, each summing its own slice of one large array (numpy releases
    the GIL in the reduction); the best pass counts, as a decode step is a best-effort stream of the weights too."""
    data = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    slices = np.array_split(data, threads)
    best = float("inf")
    for _ in range(passes):
        workers = [threading.Thread(target=np.sum, args=(piece,)) for piece in slices]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def table(budget: dict) -> str:
    """The budget as a text table: ms per token, share of the token, MB read, GB/s reached."""
    total = budget["step_ms"] + budget["host_ms"]
    rows = [(name, p["ms"], p["bytes"], p["nodes"]) for name, p in budget["parts"].items()]
    rows += [("onnxruntime between nodes", budget["between_nodes_ms"], 0, None),
             ("rest of the step (our call, noise)", budget["call_ms"], 0, None),
             ("host (sampling, text, records)", budget["host_ms"], 0, None)]
    lines = [f"{'part':32} {'nodes':>5} {'ms/token':>9} {'share':>6} {'MB read':>8} {'GB/s':>6}"]
    for name, ms, read, nodes in rows:
        rate = f"{read / ms / 1e6:6.1f}" if read and ms > 0 else ""
        megabytes = f"{read / 1e6:8.2f}" if read else ""
        lines.append(f"{name:32} {'' if nodes is None else nodes:>5} {ms:9.3f} {ms / total:6.1%} {megabytes:>8} "
                     f"{rate:>6}".rstrip())
    mb = budget["bytes_per_token"] / 1e6
    reached = budget["bytes_per_token"] / (total / 1000) / 1e9
    lines.append(f"{'token':32} {budget['nodes']:>5} {total:9.3f} {1:6.1%} {mb:8.1f} {reached:6.1f}")
    lines.append(f"{1000 / total:.1f} tok/s; weights and cache read at {reached:.1f} GB/s, "
                 f"{reached / budget['read_gb_s']:.0%} of the {budget['read_gb_s']:.1f} GB/s "
                 f"{budget['threads'] or 'all'} threads read here (numpy); {budget['prompt_tokens']}-token prompt, "
                 f"{budget['new_tokens']} steps. Kernel times less the profiler's "
                 f"{budget['profiler_us_per_kernel']:.1f} µs per kernel; onnxruntime "
                 f"{budget['dispatch_us_per_node']:.2f} µs per node")
    return "\n".join(lines)
