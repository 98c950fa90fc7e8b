"""What a pass of m rows costs this CPU, per int4/int8 matrix of a bundle: the figure behind speculative decoding's
draft sizing (a verifying pass is m rows) and prefill speed (128 rows).

    python benchmarks/rows.py BUNDLE [--threads 2] [--levels 4,0] [--rows 1,2,4,8,128]

Each distinct MatMulNBits shape of the bundle's graph (K, N, bits, block size) is timed alone, with random weights
of that shape, at each accuracy level asked for (the bundle's own first), as the median of repeated calls. Its
weights then sit in the CPU's caches, so one row shows the kernel's arithmetic rather than the memory's speed;
extra rows are arithmetic either way, which is what decides how cheap a verifying pass is. The last lines add the
shapes up as often as the graph has them: the model's matrix time for m rows, relative to one row.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np


def main() -> None:
    args = parse()
    shapes, own = matrices(Path(args.bundle))
    levels = sorted(own) + [lv for lv in args.levels if lv not in own]
    rows = args.rows
    print(f"{'K x N, bits, block':26s} {'count':>5s} {'level':>5s} {'1 row ms':>9s}  " +
          "  ".join(f"x{m:<5d}" for m in rows[1:]) + "   GMAC/s at the most rows")
    for level in levels:
        totals = dict.fromkeys(rows, 0.0)
        for (k, n, bits, block), count in sorted(shapes.items()):
            session = matrix_session(k, n, bits, block, level, args.threads)
            ms = {m: time_rows(session, k, m) for m in rows}
            for m in rows:
                totals[m] += count * ms[m]
            gmacs = k * n * rows[-1] / ms[rows[-1]] / 1e6
            print(f"{f'{k} x {n}, {bits}, {block}':26s} {count:5d} {level:5d} {ms[rows[0]]:9.3f}  " +
                  "  ".join(f"{ms[m] / ms[rows[0]]:<6.2f}" for m in rows[1:]) + f"   {gmacs:.0f}")
        print(f"{'all matrices':26s} {sum(shapes.values()):5d} {level:5d} {totals[rows[0]]:9.3f}  " +
              "  ".join(f"{totals[m] / totals[rows[0]]:<6.2f}" for m in rows[1:]))


def matrix_session(k: int, n: int, bits: int, block: int, level: int, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(one_matrix(k, n, bits, block, level), options, providers=["CPUExecutionProvider"])


def time_rows(session, k: int, m: int) -> float:
    """Milliseconds of one call with m rows: the median of calls for about half a second, after a tenth of a
    second of warm-up (a few calls of a small matrix would leave the thread pool and the clock speed cold)."""
    a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    warm = time.perf_counter()
    while time.perf_counter() - warm < 0.1:
        session.run(None, {"A": a})
    times, spent = [], 0.0
    while spent < 0.5 or len(times) < 7:
        started = time.perf_counter()
        session.run(None, {"A": a})
        times.append(time.perf_counter() - started)
        spent += times[-1]
    return statistics.median(times) * 1e3


def one_matrix(k: int, n: int, bits: int, block: int, level: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = -(-k // block)
    weights = rng.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(weights, "B"), numpy_helper.from_array(scales, "scales")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def matrices(bundle: Path) -> tuple[Counter, set[int]]:
    """How often the bundle's graph has each MatMulNBits shape (K, N, bits, block size), and its accuracy levels."""
    import onnx
    from onnx import helper

    from edge.bundle import read_manifest

    model = bundle / read_manifest(bundle / "manifest.json")["onnx"]["file"]
    nodes = [{a.name: helper.get_attribute_value(a) for a in node.attribute}
             for node in onnx.load(str(model), load_external_data=False).graph.node if node.op_type == "MatMulNBits"]
    return (Counter((a["K"], a["N"], a.get("bits", 4), a["block_size"]) for a in nodes),
            {a.get("accuracy_level", 0) for a in nodes})


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[4],
                        help="accuracy levels to time besides the bundle's own (e.g. 4,0)")
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 128],
                        help="row counts; the first is the reference (%(default)s)")
    return parser.parse_args()


if __name__ == "__main__":
    main()
