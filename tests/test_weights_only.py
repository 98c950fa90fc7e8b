"""benchmarks/weights_only.py: its rotation leaves the model's function unchanged, and its rounding puts every
projection on the preset's grid."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import transformers
import weights_only  # benchmarks/, put on the path by conftest.py

from families import SMALL

CONFIGS = {"llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
           "qwen2-untied-bias": ("Qwen2Config", dict(tie_word_embeddings=False)),
           "qwen3-head-norms": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=16))}


def tiny(name: str):
    config_class, overrides = CONFIGS[name]
    config = getattr(transformers, config_class)(vocab_size=96, **{**SMALL, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that both are tested
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rotation_keeps_the_function(name):
    model = tiny(name)
    ids = list(range(3, 40))
    before = weights_only.scored_rows(model, ids, 64)
    weights_only.rotate(model, np.random.default_rng(0))
    after = weights_only.scored_rows(model, ids, 64)
    assert np.allclose(before[0][0], after[0][0], atol=1e-4)
    figures = weights_only.against(before, model, ids, 64)
    assert figures["top1_agreement"] == 1 and abs(figures["perplexity_ratio"] - 1) < 1e-5


def test_hadamard_is_orthonormal_and_refuses_other_sizes():
    h = weights_only.hadamard(16, np.random.default_rng(1))
    assert np.allclose(h @ h.T, np.eye(16))
    with pytest.raises(ValueError, match="power of two"):
        weights_only.hadamard(12, np.random.default_rng(1))


def test_rounding_puts_weights_on_the_presets_grid():
    model = tiny("llama-tied")
    grams = weights_only.gram_matrices(model, list(range(3, 60)), 64)
    args = argparse.Namespace(preset="int4-plain", asymmetric=False, damping=None, block_size=None, rounding=None)
    weights_only.round_weights(model, args, grams)
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().numpy().T  # [K, N], blocks along K
    blocks = q_proj.reshape(-1, 32, q_proj.shape[1])
    levels = [len(np.unique(np.round(blocks[b, :, n] / np.abs(blocks[b, :, n]).max(), 5)))
              for b in range(blocks.shape[0]) for n in range(q_proj.shape[1])]
    assert max(levels) <= 16  # 4 bits: at most 16 values a block
    table = model.get_input_embeddings().weight.detach().numpy()  # int4-plain: the table at 4 bits too
    assert len(np.unique(np.round(table[0, :32] / np.abs(table[0, :32]).max(), 5))) <= 16
