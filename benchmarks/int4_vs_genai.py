"""Check that edge-llm's int4 weights are bit-identical to onnxruntime-genai's for the same checkpoint.

    python benchmarks/int4_vs_genai.py BUNDLE/model.onnx GENAI_DIR/model.onnx

Same block size (32), symmetric, same rounding: identical MatMulNBits bytes and scales mean identical int4 quality,
so a quality comparison on a trained model is not needed for the recipe itself. Both pack q/k/v into one weight;
our packed gate/up is compared with the concatenation of genai's separate gate and up.
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import numpy_helper


def int4_weights(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """layer-relative name (e.g. "layers.3.mlp.down_proj", "lm_head") -> (packed bytes, scales)."""
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            name = node.name.replace("/model/", "").replace("/model.", "").strip("/").split("/MatMul")[0]
            out[name.replace("/", ".").replace(".attn.", ".self_attn.")] = tuple(
                numpy_helper.to_array(inits[x]) for x in node.input[1:3])
    return out


def main(ours_path: str, theirs_path: str) -> int:
    ours, theirs = int4_weights(ours_path), int4_weights(theirs_path)
    for prefix in {name.rsplit(".", 1)[0] for name in theirs if ".mlp." in name}:  # genai keeps gate and up apart
        gate, up = theirs.pop(f"{prefix}.gate_proj"), theirs.pop(f"{prefix}.up_proj")
        theirs[f"{prefix}.gate_up_proj"] = tuple(np.concatenate([g, u]) for g, u in zip(gate, up))
    differ = [n for n in theirs if n not in ours or any(not np.array_equal(a, b) for a, b in zip(ours[n], theirs[n]))]
    print(f"{len(theirs) - len(differ)} of {len(theirs)} int4 weights bit-identical" +
          (f"; different or missing: {', '.join(sorted(differ)[:8])}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
