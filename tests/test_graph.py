"""The fast graph: fused onnxruntime ops, KV buffers shared between past and present, no copy per step."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import greedy_by_hand
from families import STORIES, shared

import edge
from edge.export.errors import ExportError
from edge.export.pipeline import export


def ops(bundle) -> set[str]:
    return {n.op_type for n in onnx.load(bundle / "model.onnx", load_external_data=False).graph.node}


def test_the_graph_uses_fused_ops_and_returns_the_last_position(exports):
    bundle = exports.bundle("qwen3")
    used = ops(bundle)
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= used
    assert not used & {"Softmax", "Pow", "ReduceMean", "Sqrt"}  # no spelled-out attention or RMSNorm
    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_param == "logits_length"  # logits_to_keep rows: 1 but to verify
    assert "logits_to_keep" in {i.name for i in model.graph.input}
    onnx_spec = edge.load(bundle).bundle.manifest["onnx"]
    assert (onnx_spec["graph"], onnx_spec["kv"], onnx_spec["logits_positions"]) == ("fast", "shared-buffer", "last")


def test_kv_buffers_are_shared_and_never_copied(exports):
    engine = edge.load(exports.bundle("qwen3"), context_length=64)
    state = engine.decoder.new_state()
    buffers = state.keys + state.values
    addresses = [buffer.ctypes.data for buffer in buffers]
    assert all(buffer.shape == (1, 2, 64, 32) for buffer in buffers)  # sized to the context
    logits = engine.decoder.forward(np.array(engine.encode("Hello there, how are you?")), state)
    for _ in range(10):
        logits = engine.decoder.forward(np.array([int(np.argmax(logits[-1]))]), state)
        assert [buffer.ctypes.data for buffer in state.keys + state.values] == addresses
    binding, _ = state.bound
    bound = [value.data_ptr() for value in binding.get_outputs()]
    assert set(bound) >= set(addresses)  # present outputs are the past buffers


def test_a_full_cache_is_refused(exports):
    engine = edge.load(exports.bundle("qwen3"), context_length=32)
    cache = engine.decoder.new_state()
    engine.decoder.forward(np.arange(30), cache)
    with pytest.raises(ValueError, match="holds 32 tokens"):
        engine.decoder.forward(np.arange(3), cache)


@pytest.mark.parametrize("profile", [None, "raspberry-pi-4"])
def test_every_int4_export_asks_for_int8_activations(exports, tmp_path, profile):
    """Accuracy level 4 on every MatMulNBits, whatever the profile or none: onnxruntime computes in fp32 where a CPU
    lacks the int8 kernels (shown under an emulated Cortex-A72 in tests/test_arm64.py)."""
    manifest = export(str(exports.checkpoint("llama3.2")), str(tmp_path / "b"), quant="int4" if not profile else None,
                      profile=profile)
    assert manifest["onnx"]["graph"] == "fast" and manifest["quantization"]["accuracy_level"] == 4
    model = onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    levels = [next((a.i for a in n.attribute if a.name == "accuracy_level"), None) for n in nbits]
    assert nbits and levels == [4] * len(nbits)
    table = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in nbits if "lm_head" in n.name)
    assert table.input[0] == head.input[1]
    engine = edge.load(tmp_path / "b", profile="raspberry-pi-5")
    prompt = engine.encode("The little robot")
    records = list(engine.stream(prompt, temperature=0, max_tokens=8))
    assert [r.token for r in records] == greedy_by_hand(engine, prompt, 8)


def test_the_optimum_graph_stays_available(exports, tmp_path):
    slow_bundle = exports.bundle("qwen3", graph="optimum")
    manifest = json.loads((slow_bundle / "manifest.json").read_text())
    assert manifest["onnx"]["graph"] == "optimum" and manifest["onnx"]["kv"] == "growing"
    slow, fast = edge.load(slow_bundle), edge.load(exports.bundle("qwen3"))
    args = dict(temperature=0, max_tokens=12)
    assert [r.token for r in slow.stream("Hello", **args)] == [r.token for r in fast.stream("Hello", **args)]
    with pytest.raises(ExportError, match="multiple of 16, not 8"):  # stories260K's heads are 8 wide
        export(str(shared(STORIES)), str(tmp_path / "s"), quant="fp32", graph="fast")


def test_phi3_runs_on_the_fast_graph_with_its_window_and_longrope(exports):
    model = onnx.load(exports.bundle("phi3") / "model.onnx", load_external_data=False)
    windows = {a.i for n in model.graph.node if n.op_type == "GroupQueryAttention"
               for a in n.attribute if a.name == "local_window_size"}
    assert windows == {8}  # the checkpoint's sliding_window
    # longrope is one fixed table only up to original_max_position_embeddings: the bundle's context stops there
    engine = edge.load(exports.bundle("phi3-longrope"))
    assert engine.bundle.manifest["onnx"]["graph"] == "fast" and engine.decoder.context_length == 64


@pytest.mark.parametrize("name, softcap, tables", [("gemma2", 50.0, 1), ("gemma3", 0.0, 2)])
def test_gemma_layers_alternate_sliding_and_full_attention(exports, name, softcap, tables):
    model = onnx.load(exports.bundle(name) / "model.onnx", load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert [a["local_window_size"] for a in attributes] == [8, -1]  # layer_types: sliding, then full
    assert all(a["scale"] == pytest.approx(16 ** -0.5) and a.get("softcap", 0.0) == softcap for a in attributes)
    # Gemma 3's sliding layers rotate with their own (local) base frequency: a cos table of their own
    assert len({n.input[7] for n in nodes}) == tables


def test_sliding_window_bundles_refuse_an_onnxruntime_that_widens_the_window(exports, monkeypatch):
    import edge.session

    assert edge.load(exports.bundle("mistral")).bundle.manifest["onnx"]["min_onnxruntime"] == "1.24"
    assert "min_onnxruntime" not in edge.load(exports.bundle("qwen3")).bundle.manifest["onnx"]  # no window
    monkeypatch.setattr(edge.session, "onnxruntime_version", lambda: (1, 23))
    with pytest.raises(edge.BundleError, match="needs onnxruntime >= 1.24"):
        edge.load(exports.bundle("mistral"))
    edge.load(exports.bundle("qwen3"))  # the floor stays 1.23 for the rest


def test_longrope_context_without_original_max_falls_back_to_the_model_maximum():
    from types import SimpleNamespace

    from edge.export.graph import max_context

    config = SimpleNamespace(rope_scaling={"rope_type": "longrope"}, max_position_embeddings=100)
    assert max_context(config) == 100
    assert max_context(SimpleNamespace(rope_scaling={"type": "longrope", "original_max_position_embeddings": 64},
                                       max_position_embeddings=100)) == 64
