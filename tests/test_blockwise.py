"""export/blockwise.py: its bytes are what onnxruntime's MatMulNBits reads, its absmax rounding is onnxruntime's
quantizer's bit for bit, and its searched and GPTQ roundings lose less than absmax on the data they are fit to."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.export import blockwise

K, N = 128, 48


def weight(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[rng.integers(0, K, 6), rng.integers(0, N, 6)] *= 6  # a few outliers, as trained weights have
    return w


def activations(seed: int = 1, rows: int = 512) -> np.ndarray:
    """Correlated inputs with uneven channel energy: what makes weighting and compensation matter."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) / np.sqrt(K) + np.eye(K)
    return (rng.standard_normal((rows, K)) * rng.uniform(0.1, 3, K)) @ mix


def one_matmul(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/lm_head/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_absmax_rounding_is_onnxruntimes_bit_for_bit(bits):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    w = weight()
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits, accuracy_level=None)
    quantizer = MatMulNBitsQuantizer(one_matmul(w), algo_config=config)
    quantizer.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    ours = blockwise.quantize(w, bits, 32, search=False)
    assert np.array_equal(theirs[f"w_Q{bits}"].reshape(ours.packed.shape), ours.packed)
    assert np.array_equal(theirs["w_scales"].reshape(ours.scales.shape), ours.scales)


@pytest.mark.parametrize("bits, rounding, asymmetric, block", [
    (4, "absmax", False, 32), (4, "search", False, 32), (4, "gptq", False, 32), (8, "search", False, 32),
    (4, "search", True, 32), (4, "gptq", True, 32), (4, "gptq", True, 64), (8, "search", True, 32)])
def test_matmulnbits_computes_with_the_dequantized_weight(bits, rounding, asymmetric, block):
    """Our bytes and zero points in onnxruntime's kernel (accuracy level 0: fp32 compute) equal x @ dequantized().
    K=128 in blocks of 64 is two blocks per row; trimmed to K=96 in blocks of 32, three: an odd count, whose 4-bit
    zero points are padded per row."""
    from edge.export.quantize import to_nbits

    w, x = weight(), activations(rows=8)
    if block == 32 and asymmetric:
        w, x = w[:96], x[:, :96]
    gram = x.T @ x / len(x)
    model = to_nbits(one_matmul(w), {"/lm_head/MatMul": (bits, block, rounding, asymmetric)}, accuracy_level=0,
                     grams={"/lm_head/MatMul": gram})
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    assert len(model.graph.node[0].input) == (4 if asymmetric else 3)
    if rounding == "gptq":
        q = blockwise.quantize_compensated(w, bits, block, gram, asymmetric=asymmetric)
    else:
        q = blockwise.quantize(w, bits, block, np.diag(gram), search=rounding != "absmax", asymmetric=asymmetric)
    assert (q.zero_points is not None) == asymmetric
    np.testing.assert_allclose(run(model, x), x.astype(np.float32) @ q.dequantized(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("compensated", [False, True])
def test_zero_points_lose_less_than_symmetric_weights(compensated):
    """A block of shifted weights (trained weights often are) wastes half the symmetric grid; a zero point per
    block recovers it, on the weighted weight error and on the layer's output alike."""
    w, x = weight() + 0.5 * np.random.default_rng(2).standard_normal(N).astype(np.float32), activations()
    gram = x.T @ x / len(x)
    energy = np.diag(gram)
    errors = {}
    for asymmetric in (False, True):
        q = (blockwise.quantize_compensated(w, 4, 32, gram, asymmetric=asymmetric) if compensated
             else blockwise.quantize(w, 4, 32, energy, asymmetric=asymmetric))
        levels = blockwise.unpack(q.packed, 4)
        assert levels.max() <= 15 and (q.zero_points is None or q.zero_points.max() <= 15)
        errors[asymmetric] = (float((energy[:, None] * (w - q.dequantized()) ** 2).sum()),
                              float(((x @ (w - q.dequantized())) ** 2).mean()))
    assert errors[True][0] < errors[False][0] * 0.9 and errors[True][1] < errors[False][1] * 0.9, errors


@pytest.mark.parametrize("bits", [4, 8])
def test_searched_scales_never_lose_to_absmax_on_the_weighted_error(bits):
    w, x = weight(), activations()
    energy = (x ** 2).mean(0)
    errors = {}
    for search in (False, True):
        q = blockwise.quantize(w, bits, 32, energy, search=search)
        errors[search] = float((energy[:, None] * (w - q.dequantized()) ** 2).sum())
    assert errors[True] < errors[False] * 0.95, errors


def test_gptq_keeps_the_layer_output_closer_than_searched_scales():
    w, x = weight(), activations()
    gram = x.T @ x / len(x)
    want = x @ w
    outputs = {"search": x @ blockwise.quantize(w, 4, 32, np.diag(gram)).dequantized(),
               "gptq": x @ blockwise.quantize_compensated(w, 4, 32, gram).dequantized()}
    errors = {k: float(((v - want) ** 2).mean()) for k, v in outputs.items()}
    assert errors["gptq"] < errors["search"] * 0.9, errors


def test_a_block_of_zeros_stays_zero():
    w = weight()
    w[:32, 0] = 0
    for q in (blockwise.quantize(w, 4, 32), blockwise.quantize(w, 4, 32, search=False),
              blockwise.quantize(w, 4, 32, asymmetric=True)):
        assert np.all(q.dequantized()[:32, 0] == 0) and np.isfinite(q.scales).all()


def test_k_must_split_into_blocks():
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        blockwise.quantize(weight()[:100], 4, 32)
