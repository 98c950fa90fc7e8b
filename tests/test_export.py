"""Every supported family: the fp32 bundle reproduces transformers step by step, through the API and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_edge
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
    cache = engine.model.new_cache()
    got = [engine.model.forward(cache, np.array(prompt))[-1]]
    for token in want_tokens[:-1]:
        got.append(engine.model.forward(cache, np.array([token]))[-1])
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


@pytest.mark.parametrize("name, quant", [("tinyllama", "int4"), ("qwen3", "int4"), ("gemma2", "int8"),
                                         ("phi3", "int8"), ("smollm2", "fp16")])
def test_quantized_bundles_of_other_families(exports, name, quant):
    """Untied and tied embeddings, big and small vocabularies: each method exports, loads and tracks fp32."""
    engine, reference = edge.load(exports.bundle(name, quant)), edge.load(exports.bundle(name))
    figures = engine.bundle.manifest["validation"]["quantization"]
    assert engine.bundle.manifest["quantization"]["method"] == quant
    assert figures["perplexity_ratio"] == pytest.approx(figures["perplexity"] / figures["perplexity_fp32"])
    prompt = np.array(engine.encode(PROMPT))
    got = engine.model.forward(engine.model.new_cache(), prompt)
    want = reference.model.forward(reference.model.new_cache(), prompt)
    # Random weights make error sizes meaningless beyond "close to fp32"; quality is measured on stories260K.
    tolerance = {"fp16": 1e-2, "int8": 0.5, "int4": 1.0}[quant]
    assert np.abs(got - want).max() < tolerance * np.abs(want).max()
    assert len(list(engine.stream(PROMPT, temperature=0, max_tokens=5))) >= 1


def test_an_untied_embedding_is_int8_in_an_int8_bundle(exports):
    """Phi-3 unties its embedding: in int8 it is gathered from 8-bit blocks, not kept as an fp32 table."""
    import onnx

    model = onnx.load(exports.bundle("phi3", "int8") / "model.onnx", load_external_data=False)
    gathers = [n for n in model.graph.node if "input_ids" in n.input]
    assert [n.op_type for n in gathers] == ["GatherBlockQuantized"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gathers[0].attribute}["bits"] == 8
    tables = [i for i in model.graph.initializer if i.name == gathers[0].input[0]]
    assert tables and tables[0].data_type == onnx.TensorProto.UINT8
