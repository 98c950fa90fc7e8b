"""benchmarks/rows.py: the one-matrix model it times computes what its shape says, and it reads a bundle's shapes."""
from __future__ import annotations

import numpy as np
import pytest
import rows  # benchmarks/, put on the path by conftest.py


@pytest.mark.parametrize("bits, level", [(4, 4), (4, 0), (8, 4)])
def test_one_matrix_is_the_dequantized_product(bits, level):
    k, n, block = 64, 24, 32
    session = rows.matrix_session(k, n, bits, block, level, threads=1)
    a = np.random.default_rng(2).standard_normal((3, k)).astype(np.float32)
    weights, scales = rows.random_matrix(k, n, bits, block)
    scales = scales.reshape(n, k // block)
    if bits == 4:
        levels = np.stack([weights & 15, weights >> 4], -1).reshape(n, k // block, block)
    else:
        levels = weights
    w = ((levels.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]).reshape(n, k)
    expected = a @ w.T
    # level 4 rounds the activations to int8 per block: an error of a few hundredths of the output's range
    tolerance = 0.03 * np.abs(expected).max() if level == 4 else 1e-4
    np.testing.assert_allclose(session.run(None, {"A": a})[0], expected, rtol=0, atol=tolerance)
    assert rows.time_rows(session, k, 2) > 0


def test_shapes_of_a_bundle(exports):
    import onnx

    graph = onnx.load(str(exports.bundle("stories260K", "int4") / "model.onnx"), load_external_data=False).graph
    nodes = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert nodes and all(rows._shape(node)[3] in (32, 64, 128) for node in nodes)
    assert {rows._level(node) for node in nodes} <= {0, 4}
