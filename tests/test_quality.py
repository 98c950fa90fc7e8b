"""The real trained stories260K model: exact greedy output in fp32, and what each quantization preset costs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import STORIES, shared
from transformers import AutoModelForCausalLM, AutoTokenizer

import edge
from edge.presets import PRESETS, roles

TEXT = (Path(__file__).parent / "data" / "story.txt").read_text(encoding="utf-8")
# (perplexity ratio below, top-1 agreement above) against the fp32 bundle, accuracy level 4; measured on this
# project's x86 machine (README, "Quantization"), with room for other CPUs' int8 activation rounding
BOUNDS = {"int4-plain": (1.2, 0.65), "int4": (1.08, 0.74), "int4-hq": (1.08, 0.76), "int4-zp": (1.08, 0.74),
          "int4-fast": (1.08, 0.74), "int8": (1.01, 0.95)}


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
    from edge.decoder import OptimumDecoder  # stories260K's head size 8 takes optimum's graph

    tokenizer = AutoTokenizer.from_pretrained(shared(STORIES))
    model = AutoModelForCausalLM.from_pretrained(shared(STORIES), torch_dtype=torch.float32).eval()
    prompt = tokenizer(TEXT).input_ids
    assert len(prompt) > 2 * OptimumDecoder.prefill_chunk
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)
    records = list(fp32.stream(prompt, temperature=0, max_tokens=30))
    assert [r.token for r in records] == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("quant", list(PRESETS))
def test_every_preset_tells_a_story_and_meets_its_bound(exports, fp32, quant):
    """Each preset exports, loads, writes a story, and keeps what the README says it keeps on the exporter's
    held-out text (export/eval_text.txt, scored in windows of the 512-token context) and on a TinyStories text."""
    engine = edge.load(exports.bundle("stories260K", quant))
    story = engine.generate("Once upon a time", temperature=0, max_tokens=80)
    words = story.split()
    assert len(words) > 25 and sum(w.strip(".,!\"'").isalpha() for w in words) / len(words) > 0.9
    manifest = engine.bundle.manifest
    assert manifest["quantization"]["preset"] == quant
    assert manifest["quantization"]["method"] == ("int8" if PRESETS[quant].bits == 8 else "int4")
    assert manifest["quantization"]["symmetric"] is not PRESETS[quant].asymmetric
    held_out = manifest["validation"]["quantization"]
    story_text = engine.evaluate(TEXT, fp32)
    ratio, agreement = BOUNDS[quant]
    print(f"\nstories260K {quant}: held-out x{held_out['perplexity_ratio']:.4f}, top-1 {held_out['top1_agreement']:.1%}, "
          f"KL {held_out['mean_kl']:.4f}; story x{story_text['perplexity_ratio']:.4f}, top-1 "
          f"{story_text['top1_agreement']:.1%} (bounds x{ratio}, {agreement:.0%})")
    for figures in (held_out, story_text):
        assert figures["perplexity_ratio"] < ratio and figures["top1_agreement"] > agreement


def test_the_presets_lose_less_than_plain_int4(exports):
    """The issue's bar on a model with native float weights: every preset beats onnxruntime's own int4 rounding
    on both perplexity ratio and top-1 agreement (the held-out figures the exporter wrote)."""
    figures = {q: json.loads((exports.bundle("stories260K", q) / "manifest.json").read_text())["validation"]
               ["quantization"] for q in PRESETS}
    plain = figures.pop("int4-plain")
    for quant, f in figures.items():
        assert f["perplexity_ratio"] < plain["perplexity_ratio"] and f["top1_agreement"] > plain["top1_agreement"], \
            (quant, f, plain)


def test_int4_fast_widens_the_mlp_blocks_only(exports):
    import onnx

    bundle = exports.bundle("stories260K", "int4-fast")
    # stories260K's gate/up rows are 64 wide; its down projection's 172 inputs fit no block of 16 or more
    assert block_sizes(onnx.load(bundle / "model.onnx")) == {"attn_qkv": {32}, "attn_out": {32}, "mlp_in": {64},
                                                             "lm_head": {64}}
    quantization = json.loads((bundle / "manifest.json").read_text())["quantization"]
    assert (quantization["block_size"], quantization["mlp_block_size"]) == (32, 64)


def block_sizes(model) -> dict[str | None, set[int]]:
    """role -> the block sizes of its MatMulNBits nodes."""
    import onnx

    blocks = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            size = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "block_size")
            blocks.setdefault(roles(node.name), set()).add(size)
    return blocks


@pytest.mark.parametrize("quant", ["int8", "int4", "int4-zp"])
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


def test_a_block_wider_than_the_rows_is_fitted_to_them(tmp_path):
    import onnx

    from edge.export.pipeline import export

    # stories260K's rows are 64 wide: blocks of 128 do not fit, 64 do; the tied table is still stored once
    export(str(shared(STORIES)), str(tmp_path / "b"), quant="int8", block_size=128)
    model = onnx.load(tmp_path / "b" / "model.onnx")
    assert set().union(*block_sizes(model).values()) == {64}
    assert [n.op_type for n in model.graph.node if "input_ids" in n.input] == ["GatherBlockQuantized"]
    assert not [t for t in model.graph.initializer if {512, 64} <= set(t.dims) and t.data_type == onnx.TensorProto.FLOAT]
