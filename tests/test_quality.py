"""The real trained stories260K model: exact greedy output in fp32, and what int8/int4 cost in perplexity."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import STORIES, shared
from transformers import AutoModelForCausalLM, AutoTokenizer

import edge

TEXT = (Path(__file__).parent / "data" / "story.txt").read_text(encoding="utf-8")
BOUNDS = {"int8": 1.05, "int4": 1.3}  # perplexity relative to the fp32 bundle, from the issue


@pytest.fixture(scope="module")
def fp32(exports):
    return edge.load(exports.bundle("stories260K", "fp32"))


def test_greedy_200_tokens_equal_transformers(fp32):
    tokenizer = AutoTokenizer.from_pretrained(shared(STORIES))
    model = AutoModelForCausalLM.from_pretrained(shared(STORIES), torch_dtype=torch.float32).eval()
    prompt = tokenizer("Once upon a time").input_ids
    assert fp32.encode("Once upon a time") == prompt
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=200, do_sample=False)
    want = out[0, len(prompt):].tolist()
    records = list(fp32.stream("Once upon a time", temperature=0, max_tokens=200))
    assert [r.token for r in records] == want
    assert "".join(r.text for r in records) == tokenizer.decode(out[0], skip_special_tokens=True)[len("Once upon a time"):]


def test_long_prompt_prefills_in_chunks_like_one_pass(fp32):
    from edge.generate import PREFILL_CHUNK

    tokenizer = AutoTokenizer.from_pretrained(shared(STORIES))
    model = AutoModelForCausalLM.from_pretrained(shared(STORIES), torch_dtype=torch.float32).eval()
    prompt = tokenizer(TEXT).input_ids
    assert len(prompt) > 2 * PREFILL_CHUNK
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)
    records = list(fp32.stream(prompt, temperature=0, max_tokens=30))
    assert [r.token for r in records] == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_bundles_tell_a_story(exports, fp32, quant):
    engine = edge.load(exports.bundle("stories260K", quant))
    story = engine.generate("Once upon a time", temperature=0, max_tokens=80)
    words = story.split()
    assert len(words) > 25 and sum(w.strip(".,!\"'").isalpha() for w in words) / len(words) > 0.9
    ratio = engine.perplexity(TEXT) / fp32.perplexity(TEXT)
    print(f"\nstories260K {quant}: perplexity {engine.perplexity(TEXT):.3f} vs fp32 {fp32.perplexity(TEXT):.3f} "
          f"= x{ratio:.4f} (bound x{BOUNDS[quant]})")
    assert ratio < BOUNDS[quant]
    manifest = engine.bundle.manifest
    assert manifest["quantization"]["method"] == quant
    assert manifest["validation"]["quantization"]["perplexity_ratio"] < BOUNDS[quant]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_bundles_store_the_tied_embedding_once(exports, quant):
    import onnx

    fp32 = onnx.load(exports.bundle("stories260K", "fp32") / "model.onnx")
    quantized = onnx.load(exports.bundle("stories260K", quant) / "model.onnx")
    big = lambda m: [t for t in m.graph.initializer if 512 in t.dims]
    assert len(big(fp32)) == 1  # lm_head reads the embedding through a Transpose, not a copy
    readers = [n.op_type for n in quantized.graph.node if "input_ids" in n.input]
    assert readers == ["GatherBlockQuantized"]  # the fp32 embedding Gather is gone
    head = next(n for n in quantized.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    table = next(n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized")
    assert table.input[0] == head.input[1]  # one packed tensor serves both
    fp32_tables = [t for t in quantized.graph.initializer
                   if {512, 64} <= set(t.dims) and t.data_type == onnx.TensorProto.FLOAT]
    assert not fp32_tables  # only the int4 bytes and their scales remain


def test_int8_stores_a_tied_embedding_once_where_its_rows_do_not_split_into_blocks(tmp_path, monkeypatch):
    import onnx

    from edge.export import quantize
    from edge.export.pipeline import export

    monkeypatch.setattr(quantize, "INT8_BLOCK", 128)  # stories260K's rows are 64 wide: no whole int8 blocks
    export(str(shared(STORIES)), str(tmp_path / "b"), quant="int8")
    model = onnx.load(tmp_path / "b" / "model.onnx")
    assert len([t for t in model.graph.initializer if 512 in t.dims]) == 1  # the fp32 table, read by lm_head too
    assert "MatMulInteger" not in {n.op_type for n in model.graph.node if "lm_head" in n.name}
