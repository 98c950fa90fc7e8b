"""The llama.cpp peer of benchmarks/compare.py: a GGUF of the checkpoint, then timed runs through llama-cpp-python.

Runs as a script inside llama-cpp-python's own environment (numpy, gguf, llama_cpp; nothing of edge-llm):

    python llamacpp.py convert HF_DIR OUT.gguf [q4_0|q4_k_m|q8_0|f16]  # f16 GGUF, then llama.cpp's quantizer
    python llamacpp.py run OUT.gguf PROMPT_TOKENS NEW_TOKENS THREADS [N_BATCH=512]
    python llamacpp.py logits OUT.gguf IDS.json OUT.npy THREADS       # teacher-forced logits (benchmarks/quality.py)

The conversion writes an f16 GGUF of a Llama/Mistral/Qwen2/Qwen3 checkpoint and hands it to
`llama_model_quantize` with LLAMA_FTYPE_MOSTLY_Q4_0, which is what `llama-quantize model.gguf Q4_0` does (so the
output/tied embedding gets llama.cpp's usual q6_K). The vocabulary is written as "no_vocab" with the model's
vocabulary size: the benchmark feeds token ids, and random-init benchmark checkpoints have no BPE to convert.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
LAYER_NAMES = {  # transformers name after "model.layers.{i}." -> GGUF name after "blk.{i}."
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(folder: Path, wanted=lambda name: True):
    """(name, float32 array) of the wanted tensors in the checkpoint's safetensors files, memory-mapped so that
    only one tensor at a time is widened; bf16 by hand, since numpy has no bfloat16."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"llama.cpp peer: {folder} has no *.safetensors weights (only those are converted)")
    for file in files:
        data = np.memmap(file, dtype=np.uint8, mode="r")
        size = int.from_bytes(data[:8].tobytes(), "little")
        header = json.loads(data[8:8 + size].tobytes())
        for name, entry in header.items():
            if name == "__metadata__" or not wanted(name):
                continue
            if entry["dtype"] not in DTYPES:
                raise SystemExit(f"llama.cpp peer: {file.name}: tensor {name} is {entry['dtype']}; only "
                                 f"{', '.join(DTYPES)} are converted")
            start, end = (8 + size + offset for offset in entry["data_offsets"])
            raw = data[start:end].view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
            bf16 = entry["dtype"] == "BF16"
            yield name, (raw.astype(np.uint32) << 16).view(np.float32) if bf16 else raw.astype(np.float32)


def gguf_name(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".", 3)  # model, layers, i, rest
    if parts[:2] == ["model", "layers"] and parts[3] in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}"
    return None


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's "llama" architecture rotates interleaved pairs; transformers rotates the two halves of each head.
    Reordering the rows of q/k by head turns one into the other."""
    split = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def rope_factors(config: dict, head_dim: int) -> np.ndarray | None:
    """Per-frequency divisors of the rotary angle, which llama.cpp reads from a `rope_freqs.weight` tensor: linear
    scaling divides every frequency, llama3's leaves high frequencies, divides low ones, and blends between."""
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return np.full(head_dim // 2, scaling["factor"], dtype=np.float32)
    if kind != "llama3":
        raise SystemExit(f"llama.cpp peer: rope_scaling {kind!r} is not converted here (default, linear, llama3)")
    inv_freq = 1.0 / config.get("rope_theta", 10000.0) ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    old = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)  # 0 below the band (divide), 1 above (keep)
    return (1.0 / ((1.0 - smooth) / factor + smooth)).astype(np.float32)


def write_f16(hf_dir: Path, out: Path) -> None:
    import gguf

    config = json.loads((hf_dir / "config.json").read_text())
    arch = ARCHES.get(config["model_type"])
    if arch is None:
        raise SystemExit(f"llama.cpp peer: {config['model_type']} is not converted here (only {', '.join(ARCHES)})")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(hf_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("no_vocab")
    writer.add_vocab_size(config["vocab_size"])
    factors = rope_factors(config, head_dim)
    if factors is not None:
        if arch != "llama":
            raise SystemExit(f"llama.cpp peer: rope scaling is only converted for Llama-layout models, not {arch}")
        writer.add_tensor("rope_freqs.weight", factors)
    tied = config.get("tie_word_embeddings")
    for name, weight in read_safetensors(hf_dir, lambda n: gguf_name(n) and not (tied and n == "lm_head.weight")):
        target = gguf_name(name)
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            weight = rope_permute(weight, heads if ".attn_q." in target else kv_heads)
        writer.add_tensor(target, weight.astype(np.float16) if weight.ndim == 2 else weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "f16": None}


def convert(hf_dir: Path, out: Path, ftype: str = "q4_0") -> None:
    """An f16 GGUF of the checkpoint, then llama.cpp's own quantizer to ftype (what `llama-quantize` does)."""
    import llama_cpp

    f16, partial = out.with_suffix(".f16.gguf"), out.with_suffix(".partial")
    try:  # the cache holds whole files only: an interrupted conversion must not be mistaken for one
        write_f16(hf_dir, f16)
        if FTYPES[ftype] is None:
            f16.replace(out)
            return
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, FTYPES[ftype])
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(partial).encode(), params):
            raise SystemExit(f"llama.cpp peer: llama_model_quantize failed on {f16}")
        partial.replace(out)
    finally:
        f16.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)


def run(gguf: str, prompt_tokens: int, new_tokens: int, threads: int, n_batch: int = 512) -> dict:
    """One measurement, shaped like edge-llm's: load, prefill the same seeded prompt (n_batch tokens per
    evaluation; 1 where batched evaluation crashes, see logits()), greedy-decode new_tokens."""
    import llama_cpp

    start = time.perf_counter()
    threads = threads or os.cpu_count()  # llama-cpp-python's own default is half the cores; the others take all
    llm = llama_cpp.Llama(gguf, n_ctx=prompt_tokens + new_tokens + 8, n_batch=n_batch, n_ubatch=n_batch,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load = time.perf_counter() - start
    vocab = llm.n_vocab()
    prompt = np.random.default_rng(0).integers(3, min(vocab, 30000), size=prompt_tokens).tolist()
    t0 = time.perf_counter()
    llm.eval(prompt)
    token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
    end = time.perf_counter()
    peak = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    return {"load_s": load, "ttft_s": first - t0, "prefill_tok_s": prompt_tokens / (first - t0),
            "decode_tok_s": (new_tokens - 1) / (end - first), "peak_rss_mb": peak, "tokens": new_tokens}


def logits(gguf: str, ids_file: str, out: str, threads: int) -> None:
    """Teacher-forced logits of every position of the token ids (a JSON list of windows) into a .npy file
    (float32 [positions, vocab], windows one after the other), evaluated one token at a time: batched
    evaluation of q4_0 crashes in llama-cpp-python 0.3.36 built with GGML_NATIVE on an AVX-512/AMX CPU."""
    import llama_cpp

    windows = json.loads(Path(ids_file).read_text())
    llm = llama_cpp.Llama(gguf, n_ctx=max(len(w) for w in windows) + 8, n_batch=1, n_ubatch=1, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    vocab = llm.n_vocab()
    rows = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(sum(len(w) - 1 for w in windows), vocab))
    i = 0
    for window in windows:
        llm.reset()
        for token in window[:-1]:
            llm.eval([token])
            rows[i] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
            i += 1
    rows.flush()


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        convert(Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:5])
    elif sys.argv[1] == "logits":
        logits(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        print(json.dumps(run(sys.argv[2], *map(int, sys.argv[3:7]))))
