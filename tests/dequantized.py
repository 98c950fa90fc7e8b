"""The source model with a bundle's stored weights put back into it, in torch: what a quantized bundle computes at
accuracy level 0 (fp32 compute), up to float rounding.

The weights are read from the bundle's own MatMulNBits and GatherBlockQuantized initializers and dequantized
here, independently of export/blockwise.py, so a bundle that computes with anything but what it stored (a wrong
layout, a weight that missed quantization, a table gathered from the wrong bytes) is told apart from the error
quantization itself brings.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _levels(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed.astype(np.float32)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.float32)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def matmul_weight(node, inits: dict) -> np.ndarray:
    """A MatMulNBits' B as the [N, K] weight of a torch Linear: (q - 2^(bits-1)) * scale per block."""
    a = _attrs(node)
    assert len(node.input) == 3, f"{node.name}: zero points are not expected"
    q = _levels(inits[node.input[1]], a["bits"]).reshape(a["N"], -1, a["block_size"])
    scales = inits[node.input[2]].reshape(a["N"], -1, 1)
    return ((q - 2 ** (a["bits"] - 1)) * scales).reshape(a["N"], a["K"])


def gathered_table(node, inits: dict, scale_of: dict) -> np.ndarray:
    """A GatherBlockQuantized's table as [vocab, hidden] (uint8 data, zero point 2^(bits-1), blocks along rows)."""
    a = _attrs(node)
    data = inits[node.input[0]]
    scales = scale_of.get(node.input[2], inits.get(node.input[2]))
    q = _levels(data, a["bits"]).reshape(data.shape[0], -1, a["block_size"])
    zero = 2 ** (a["bits"] - 1)
    if len(node.input) > 3 and node.input[3]:
        zero = _levels(inits[node.input[3]], a["bits"]).reshape(data.shape[0], -1, 1)
    return ((q - zero) * scales.reshape(data.shape[0], -1, 1)).reshape(data.shape[0], -1)


def stored_weights(bundle: Path) -> dict[str, np.ndarray]:
    """Source parameter name (a fused qkv/gate_up under its fused name) -> the weight the bundle computes with."""
    model = onnx.load(bundle / "model.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # The tied table's scales reach GatherBlockQuantized through a Reshape of lm_head's scales.
    scale_of = {n.output[0]: inits[n.input[0]] for n in model.graph.node
                if n.op_type == "Reshape" and n.input[0] in inits and n.input[0].endswith("_scales")}
    weights = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            name = re.sub(r"/MatMul_Q\d+$", "", node.name).strip("/").replace("/", ".")
            weights[name + ".weight"] = matmul_weight(node, inits)
        elif node.op_type == "GatherBlockQuantized":
            weights["model.embed_tokens.weight"] = gathered_table(node, inits, scale_of)
    return weights


def reference(checkpoint, bundle: Path) -> torch.nn.Module:
    """The checkpoint with every weight the bundle quantized replaced by the bundle's dequantized one."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head too
    stored = stored_weights(Path(bundle))
    assert any(name.endswith("lm_head.weight") for name in stored), sorted(stored)
    with torch.no_grad():
        for name, value in stored.items():
            for part, piece in _parts(name, value, params):
                params[part].copy_(torch.from_numpy(np.ascontiguousarray(piece)))
    return model


def _parts(name: str, value: np.ndarray, params: dict):
    """A fused projection of the fast graph split back into its source weights, in the order it was packed."""
    if name in params:  # Phi-3 fuses them in the checkpoint too
        return [(name, value)]
    for fused, parts in ((".qkv_proj.", ("q_proj", "k_proj", "v_proj")), (".gate_up_proj.", ("gate_proj", "up_proj"))):
        if fused in name:
            names = [name.replace(fused, f".{p}.") for p in parts]
            cuts = np.cumsum([params[n].shape[0] for n in names])[:-1]
            return list(zip(names, np.split(value, cuts)))
    return [(name, value)]
