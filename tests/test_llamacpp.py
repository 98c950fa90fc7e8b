"""The llama.cpp peer's GGUF conversion (benchmarks/llamacpp.py): names, the rope row order, and reading
safetensors without torch."""
from __future__ import annotations

import numpy as np
import pytest

from llamacpp import gguf_name, read_safetensors, rope_permute


@pytest.mark.parametrize("name, want", [
    ("model.embed_tokens.weight", "token_embd.weight"), ("lm_head.weight", "output.weight"),
    ("model.layers.3.self_attn.k_proj.bias", "blk.3.attn_k.bias"), ("model.layers.0.mlp.down_proj.weight",
                                                                     "blk.0.ffn_down.weight"),
    ("model.layers.11.self_attn.q_norm.weight", "blk.11.attn_q_norm.weight"),
    ("model.rotary_emb.inv_freq", None),
])
def test_tensor_names(name, want):
    assert gguf_name(name) == want


def rotate(v: np.ndarray, angles: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rotary embedding of one head vector: pairs (2j, 2j+1) when interleaved (llama.cpp's "llama"), else
    (j, j + d/2) (transformers)."""
    half = len(v) // 2
    first, second = (v[0::2], v[1::2]) if interleaved else (v[:half], v[half:])
    a, b = first * np.cos(angles) - second * np.sin(angles), first * np.sin(angles) + second * np.cos(angles)
    return np.stack([a, b], axis=1).reshape(-1) if interleaved else np.concatenate([a, b])


@pytest.mark.parametrize("heads", [1, 3])
def test_permuted_rows_turn_half_split_rope_into_interleaved_rope(heads):
    rng = np.random.default_rng(0)
    head_dim, hidden = 8, 12
    weight, x = rng.standard_normal((heads * head_dim, hidden)), rng.standard_normal(hidden)
    angles = rng.uniform(0, 3, head_dim // 2)
    hf = np.concatenate([rotate(h, angles, False) for h in np.split(weight @ x, heads)])
    cpp = np.concatenate([rotate(h, angles, True) for h in np.split(rope_permute(weight, heads) @ x, heads)])
    # the same vectors in llama.cpp's row order, so every q.k dot product is unchanged
    assert np.allclose(cpp, rope_permute(hf[:, None], heads)[:, 0])


def test_safetensors_are_read_like_torch_reads_them(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.randn(5), "c": torch.randn(2, 2).half()}
    save_file(tensors, tmp_path / "model.safetensors")
    got = dict(read_safetensors(tmp_path))
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == np.float32 and np.array_equal(got[name], tensor.float().numpy())


def test_the_f16_gguf_holds_every_tensor_under_llama_cpp_names(exports, tmp_path):
    gguf = pytest.importorskip("gguf")
    from llamacpp import write_f16

    checkpoint = exports.checkpoint("qwen2.5")
    write_f16(checkpoint, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads the embedding for both
    assert tensors["token_embd.weight"] == (64, 151669) and tensors["blk.1.attn_q.bias"] == (64,)
    assert len([n for n in tensors if n.startswith("blk.0.")]) == 12  # norms x2, q/k/v (+bias), o, gate, up, down
    fields = reader.fields
    assert int(fields["qwen2.vocab_size"].parts[-1][0]) == 151669
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "no_vocab"


@pytest.mark.parametrize("name", ["llama3.2", "llama-linear-rope"])
def test_rope_factors_give_transformers_frequencies(exports, name):
    import json

    from transformers import AutoModelForCausalLM

    from llamacpp import rope_factors

    checkpoint = exports.checkpoint(name)
    config = json.loads((checkpoint / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    default = 1.0 / config.get("rope_theta", 10000.0) ** (np.arange(0, head_dim, 2) / head_dim)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint).model.rotary_emb.inv_freq.numpy()
    assert np.allclose(default / rope_factors(config, head_dim), theirs, rtol=1e-5)
