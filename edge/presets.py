"""The quantization presets `edge export --quant` offers: which weights get how many bits, and how they are rounded.

Presets are data, here in the runtime package because the CLI and the device profiles name them too (the
exporter, export/quantize.py, carries them out). The figures that justify each one (size, fidelity, decode speed)
are in the README's table, measured by benchmarks/quality.py on the real SmolLM2-135M-Instruct and on stories260K.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str  # one line for --help and the README
    bits: int  # bits of every MatMul weight not named below
    head_bits: int  # the output projection (lm_head) and, when tied, the embedding gathered from the same bytes
    raised: tuple[str, ...] = ()  # MatMul roles (see roles()) kept at 8 bits: the most sensitive per byte
    rounding: str = "gptq"  # "gptq": error-compensating; "search": searched scales, nearest rounding (both in
    # export/blockwise.py); "absmax": onnxruntime's quantizer's rounding
    block_size: int = 32  # weights per scale of the `bits` weights (--block-size overrides it)
    wide_block: int = 128  # weights per scale of 8-bit weights in a 4-bit preset: 8 bits need fewer scales
    searched: tuple[str, ...] = ()  # roles rounded with searched scales even where the preset says gptq
    damping: float = 0.01  # GPTQ's dampening of the Gram matrix, as a fraction of its mean diagonal
    asymmetric: bool = False  # the `bits` weights get an integer zero point per block (not lm_head/embedding):
    # x86's int8-activation kernels take uint4 zero points at full speed; ARM's KleidiAI kernels do not
    mlp_block: int = 0  # weights per scale of the MLP's `bits` weights (gate/up, down) where wider than the
    # block size: they are most of what a token reads, and at 64 a 4-bit weight with its fp32 scale is 4.5 bits, not 5


PRESETS = {p.name: p for p in (
    Preset("int4", "4-bit GPTQ weights, 8-bit output/embedding table (the default)", bits=4, head_bits=8,
           searched=("attn_qkv",), damping=1.0),
    Preset("int4-hq", "int4 with the attention projections at 8 bits too: closest to fp32 of the 4-bit presets",
           bits=4, head_bits=8, raised=("attn_qkv",), searched=("attn_qkv",), damping=1.0),
    Preset("int4-zp", "int4 with a zero point per 4-bit block, for x86 (ARM's KleidiAI kernels need symmetric "
           "weights)", bits=4, head_bits=8, searched=("attn_qkv",), damping=1.0,
           asymmetric=True),
    Preset("int4-fast", "int4 with the MLP's weights in blocks of 64: fewer bytes a token, faster decode, a little "
           "less close to fp32", bits=4, head_bits=8, searched=("attn_qkv",), damping=1.0, mlp_block=64),
    Preset("int4-plain", "4-bit weights rounded as onnxruntime's quantizer does (onnxruntime-genai's int4)",
           bits=4, head_bits=4, rounding="absmax"),
    Preset("int8", "8-bit weights, searched scales (int8 activations at accuracy level 4)", bits=8, head_bits=8,
           rounding="search"),
)}
UNQUANTIZED = ("fp32", "fp16")
CHOICES = UNQUANTIZED + tuple(PRESETS)


def roles(node_name: str) -> str | None:
    """The part of the decoder a MatMul computes, from the node names both graph kinds write."""
    for role, marks in (("lm_head", ("lm_head",)), ("attn_qkv", ("qkv_proj", "q_proj", "k_proj", "v_proj")),
                        ("attn_out", ("o_proj",)), ("mlp_in", ("gate_up_proj", "gate_proj", "up_proj")),
                        ("mlp_down", ("down_proj",))):
        if any(f"{m}/" in node_name or node_name.endswith(m) for m in marks):
            return role
    return None


def recipe(preset: Preset, node_name: str, tied: bool, block_size: int) -> tuple[int, int, str, bool]:
    """(bits, block size, rounding, asymmetric) of one MatMul's weight."""
    role = roles(node_name)
    if role == "lm_head":
        return head_recipe(preset, tied, block_size)
    rounding = "search" if role in preset.searched and preset.rounding == "gptq" else preset.rounding
    if role in preset.raised:
        return 8, _wide(preset, block_size), rounding, False
    if role in ("mlp_in", "mlp_down"):
        block_size = mlp_block_size(preset, block_size)
    return preset.bits, block_size, rounding, preset.asymmetric


def mlp_block_size(preset: Preset, block_size: int) -> int:
    """The block of the MLP's `bits` weights: the preset's wider one where it has one."""
    return max(block_size, preset.mlp_block)


def head_recipe(preset: Preset, tied: bool, block_size: int) -> tuple[int, int, str, bool]:
    """(bits, block size, rounding, asymmetric) of the output projection. A tied lm_head's bytes are also the
    embedding table, which GPTQ's compensation (tuned to lm_head's inputs) would distort: it gets searched scales
    instead. It stays symmetric, so that the embedding gather reads the same bytes without zero points."""
    rounding = "search" if tied and preset.rounding == "gptq" else preset.rounding
    return preset.head_bits, _wide(preset, block_size) if preset.head_bits == 8 else block_size, rounding, False


def _wide(preset: Preset, block_size: int) -> int:
    """The block of 8-bit weights: a 4-bit preset's wide block, an 8-bit preset's own."""
    return block_size if preset.bits == 8 else max(block_size, preset.wide_block)


def fitted_block(k: int, block: int) -> int | None:
    """The block size for a weight with K inputs: the asked one, halved down to 16 until it divides K; None
    when none does (the weight stays fp32)."""
    while block > 16 and k % block:
        block //= 2
    return block if k % block == 0 else None
