"""Activation statistics of the fp32 graph on the exporter's calibration text: for every MatMul with a constant
weight, the mean square of each input channel, which weighs that channel's rounding error in the scale search.

The calibration text (export/calibration_text.txt) is not the held-out text the fidelity figures are measured on
(export/eval_text.txt), so the figures are not flattered by fitting the scales to them.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edge import fidelity
from edge.decoder import OptimumDecoder

TEXT = (Path(__file__).parent / "calibration_text.txt").read_text(encoding="utf-8")


def weighted_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul node name -> the name of its activation input, for MatMuls whose weight is an initializer."""
    inits = {t.name for t in model.graph.initializer}
    return {node.name: node.input[0] for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in inits}


def gram_matrices(model: onnx.ModelProto, ids: list[int], spec: dict, shape: dict) -> dict[str, np.ndarray]:
    """MatMul node name -> X^T X / T of its activations X ([T, K]) over the text, in windows of the context:
    its diagonal weighs each input channel's rounding error, the whole of it drives GPTQ."""
    import onnxruntime as ort

    inputs = weighted_inputs(model)
    names = sorted(set(inputs.values()))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in names if name not in known)
    sums, count = {}, 0
    with tempfile.TemporaryDirectory() as tmp:  # external data: a model over 2 GB is not one protobuf
        file = Path(tmp) / "probe.onnx"
        onnx.save(probe, file, save_as_external_data=True, location="probe.onnx.data")
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        for window in fidelity.windows(ids, shape["context_length"]):
            tokens = np.array(window, np.int64)
            decoder = OptimumDecoder(session, spec, shape, len(tokens))  # the probe's feeds: every input, an empty past
            feeds = decoder.feeds(tokens, decoder.new_state())
            for name, value in zip(names, session.run(names, feeds)):
                x = value.reshape(-1, value.shape[-1]).astype(np.float64)
                sums[name] = sums.get(name, 0) + x.T @ x
            count += len(tokens)
    return {node: sums[name] / count for node, name in inputs.items()}


def calibration_ids(tokenizer) -> list[int]:
    return tokenizer(TEXT).input_ids
