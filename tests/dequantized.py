"""The source model with a bundle's quantization applied to its weights (and, for int8, to the activations that
onnxruntime quantizes per call), in torch: what a quantized bundle must compute, up to float rounding.

Each rule restates what export/quantize.py asks onnxruntime for, so a bundle that quantized anything else, or
computed with anything but what it stored, is told apart from the error quantization itself brings.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from edge.export.quantize import INT8_BLOCK


def blockwise(w: torch.Tensor, block: int, bits: int) -> torch.Tensor:
    """MatMulNBits' symmetric rule along each row's blocks: the value of largest magnitude maps to the lowest code."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // block, block)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    low = 2 ** (bits - 1)
    scale = torch.where(extreme == 0, torch.ones_like(extreme), extreme / -low)
    return (torch.clamp(torch.round(blocks / scale), -low, low - 1) * scale).reshape(rows, cols)


def absmax_int8(w: torch.Tensor, group: int) -> torch.Tensor:
    """Symmetric int8 with one scale per `group` values of a row (quantize_dynamic's per-channel weights, and our
    untied embedding's blocks): the largest magnitude maps to 127."""
    groups = w.reshape(w.shape[0], -1, group)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    return (torch.round(groups / scale).clamp(-127, 127) * scale).reshape(w.shape)


def dynamic_uint8(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear: one asymmetric uint8 scale for the whole tensor, its range widened to hold 0."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255
    zero = min(max(round(-low / scale), 0), 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def reference(checkpoint, quantization: dict) -> torch.nn.Module:
    """The checkpoint as a bundle with this manifest `quantization` computes it (int4 at accuracy level 0, int8)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    head, tied = model.get_output_embeddings(), model.config.tie_word_embeddings
    method = quantization["method"]
    assert method in ("int4", "int8") and quantization.get("accuracy_level", 0) == 0, quantization
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                continue
            if method == "int4":  # every MatMul and the embedding: 4-bit blocks
                module.weight.copy_(blockwise(module.weight, quantization["block_size"], 4))
            elif tied and (module is head or isinstance(module, torch.nn.Embedding)):  # one 8-bit table for both
                module.weight.copy_(blockwise(module.weight, INT8_BLOCK, 8))
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(absmax_int8(module.weight, INT8_BLOCK))
            else:  # MatMulInteger: int8 weights per output channel, its input quantized per call
                module.weight.copy_(absmax_int8(module.weight, module.weight.shape[1]))
                # The bundle's lm_head sees only the last position, so its input's range is that position's.
                last = module is head
                module.register_forward_pre_hook(lambda _, args, last=last: (
                    dynamic_uint8(args[0][:, -1:] if last else args[0]),))
    return model
