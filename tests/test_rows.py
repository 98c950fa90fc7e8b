"""benchmarks/rows.py: the one-matrix model it times computes what its shape says, and it reads a bundle's shapes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import rows  # benchmarks/, put on the path by conftest.py
from onnx import numpy_helper

from dequantized import matmul_weight
from edge.bundle import read_manifest


@pytest.mark.parametrize("bits, level", [(4, 4), (4, 0), (8, 4)])
def test_one_matrix_is_the_dequantized_product(bits, level):
    k, n, block = 64, 24, 32
    model = onnx.load_from_string(rows.one_matrix(k, n, bits, block, level))
    w = matmul_weight(model.graph.node[0], {t.name: numpy_helper.to_array(t) for t in model.graph.initializer})
    session = rows.matrix_session(k, n, bits, block, level, threads=1)
    a = np.random.default_rng(2).standard_normal((3, k)).astype(np.float32)
    expected = a @ w.T
    # level 4 rounds the activations to int8 per block: an error of a few hundredths of the output's range
    tolerance = 0.03 * np.abs(expected).max() if level == 4 else 1e-4
    np.testing.assert_allclose(session.run(None, {"A": a})[0], expected, rtol=0, atol=tolerance)
    assert rows.time_rows(session, k, 2) > 0


def test_matrices_of_a_bundle(exports):
    bundle = exports.bundle("stories260K", "int4")
    shapes, levels = rows.matrices(bundle)
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    assert sum(shapes.values()) == sum(node.op_type == "MatMulNBits" for node in graph.node) > 0
    assert levels == {read_manifest(bundle / "manifest.json")["quantization"]["accuracy_level"]}
    assert all(k % block == 0 for k, _, _, block in shapes)
