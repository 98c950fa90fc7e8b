"""Every supported family: the fp32 bundle reproduces transformers step by step, through the API and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import dequantized
from conftest import greedy_by_hand, run_edge
from families import FAMILIES
from transformers import AutoModelForCausalLM, AutoTokenizer

import edge

PROMPT = "The little robot looked at the stars and"
STEPS = 20
MARGIN = 1e-3  # below this top-2 gap, float noise may pick either token: compare tokens only before it


def reference(checkpoint, prompt_ids):
    """transformers' greedy decode: generated ids and the raw logits of each step."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()  # sdpa drops Gemma 2's softcap
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, np.stack([step[0].numpy() for step in out.logits])


def decisive_prefix(logits: np.ndarray) -> int:
    """How many leading steps have a top-2 margin above MARGIN."""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    close = np.nonzero(top2[:, 1] - top2[:, 0] < MARGIN)[0]
    return int(close[0]) if len(close) else len(logits)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_fp32_bundle_matches_transformers(exports, name):
    checkpoint, bundle = exports.checkpoint(name), exports.bundle(name)
    engine = edge.load(bundle)
    # every test family is on the fast graph; optimum's graph has its own test (tests/test_graph.py)
    assert engine.bundle.manifest["onnx"]["graph"] == "fast"
    prompt = engine.encode(PROMPT)
    assert prompt == AutoTokenizer.from_pretrained(checkpoint)(PROMPT).input_ids
    want_tokens, want_logits = reference(checkpoint, prompt)

    # Step by step through the runtime's KV cache: prefill, then one token at a time.
    cache = engine.decoder.new_state()
    got = [engine.decoder.forward(np.array(prompt), cache)[-1]]
    for token in want_tokens[:-1]:
        got.append(engine.decoder.forward(np.array([token]), cache)[-1])
    errors = np.abs(np.stack(got) - want_logits).max(axis=-1)
    assert errors.max() < 1e-3, f"max |logit error| per step: {errors}"

    n = decisive_prefix(want_logits)
    assert n >= 5, "random init not decisive enough to compare tokens"
    records = list(engine.stream(prompt, temperature=0, max_tokens=STEPS))
    assert [r.token for r in records][:n] == want_tokens[:n]

    # The same continuation through the command line, as a user runs it.
    text = run_edge("run", str(bundle), PROMPT, "--temperature", "0", "--max-tokens", str(STEPS)).stdout
    assert text == "".join(r.text for r in records) + "\n"


@pytest.mark.parametrize("name", ["tinyllama", "qwen3"])
def test_manifest_describes_the_model(exports, name):
    manifest = edge.load(exports.bundle(name)).bundle.manifest
    config = AutoModelForCausalLM.from_pretrained(exports.checkpoint(name)).config
    assert manifest["model"]["num_layers"] == config.num_hidden_layers
    assert manifest["model"]["num_kv_heads"] == config.num_key_value_heads
    assert manifest["model"]["vocab_size"] == config.vocab_size
    assert manifest["validation"]["source"]["max_abs_logit_error"] < 1e-3
    assert manifest["validation"]["source"]["greedy_agreement"] == 1.0
    import onnxruntime
    import transformers

    created = manifest["created_by"]
    assert set(created) >= {"optimum-onnx", "transformers", "onnxruntime", "torch"}
    assert (created["transformers"], created["onnxruntime"]) == (transformers.__version__, onnxruntime.__version__)


def test_a_real_models_weights_lie_beside_its_graph_readable_as_the_graph_is(exports):
    """Above a few MB the weights go to model.onnx.data, which onnxruntime maps instead of parsing them out of the
    graph's protobuf (half the load time); onnx writes that file owner-only, which a service user could not read."""
    bundle = edge.load(exports.bundle("smollm2-135m", "int4")).bundle
    assert bundle.model_files() == ["model.onnx", "model.onnx.data"]
    assert (bundle.path / "model.onnx").stat().st_size < 1 << 20
    modes = {name: (bundle.path / name).stat().st_mode & 0o777 for name in bundle.model_files()}
    assert modes["model.onnx.data"] == modes["model.onnx"], modes


def rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))


FP16_TOLERANCE = 16 * 2.0**-11  # fp16 keeps 11 significant bits of every weight and activation; a few dozen
# roundings in a row, mostly cancelling, stay within 16 of them (measured: 1.3e-3 on smollm2)


@pytest.mark.parametrize("name, quant", [("tinyllama", "int4"), ("qwen3", "int4"), ("gemma2", "int8"),
                                         ("phi3", "int8"), ("smollm2", "fp16")])
def test_quantized_bundles_of_other_families(exports, name, quant):
    """Untied and tied embeddings, big and small vocabularies: each method exports, loads and computes what its
    quantization says: int4 and int8 logits equal the source model with the bundle's stored weights put back
    in torch (tests/dequantized.py), which differs from fp32 by the quantization error alone."""
    # accuracy level 0: fp32 compute, which tests/dequantized.py restates exactly (level 4's int8 activations
    # are a second rounding, checked against x86 on ARM in tests/test_arm64.py)
    engine, fp32 = edge.load(exports.bundle(name, quant, accuracy_level=0)), edge.load(exports.bundle(name))
    manifest = engine.bundle.manifest
    figures = manifest["validation"]["quantization"]
    assert manifest["quantization"]["method"] == quant
    assert figures["perplexity_ratio"] == pytest.approx(figures["perplexity"] / figures["perplexity_reference"])
    assert figures["text_tokens"] >= 2000 and 0 <= figures["top1_agreement"] <= 1 and figures["mean_kl"] >= 0
    prompt = engine.encode(PROMPT)
    got = engine.decoder.forward(np.array(prompt), engine.decoder.new_state())[-1]
    unquantized = fp32.decoder.forward(np.array(prompt), fp32.decoder.new_state())[-1]
    if quant == "fp16":
        assert rel_rms(got, unquantized) < FP16_TOLERANCE
    else:
        with torch.no_grad():
            want = dequantized.reference(exports.checkpoint(name), engine.bundle.path)(
                torch.tensor([prompt])).logits[0, -1].numpy()
        quantization_error = rel_rms(want, unquantized)
        assert rel_rms(got, want) < 1e-3 < quantization_error / 10, (rel_rms(got, want), quantization_error)
    records = list(engine.stream(prompt, temperature=0, max_tokens=5))
    assert [r.token for r in records] == greedy_by_hand(engine, prompt, 5)
    assert [r.finish_reason for r in records][-1] == ("stop" if records[-1].token in engine.eos_ids else "length")


def test_an_untied_embedding_is_int8_in_an_int8_bundle(exports):
    """Phi-3 unties its embedding: in int8 it is gathered from 8-bit blocks, not kept as an fp32 table."""
    import onnx

    model = onnx.load(exports.bundle("phi3", "int8") / "model.onnx", load_external_data=False)
    gathers = [n for n in model.graph.node if "input_ids" in n.input]
    assert [n.op_type for n in gathers] == ["GatherBlockQuantized"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gathers[0].attribute}["bits"] == 8
    tables = [i for i in model.graph.initializer if i.name == gathers[0].input[0]]
    assert tables and tables[0].data_type == onnx.TensorProto.UINT8
