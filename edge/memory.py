"""Will the model fit? An estimate of the memory a bundle takes at a context length, checked at load against
the profile's budget and what the machine really has free, so a load that cannot fit is refused with the numbers
instead of being killed by the kernel halfway through a reply."""
from __future__ import annotations

from dataclasses import dataclass

from edge.devices import Device, Profile
from edge.bundle import Bundle
from edge.decoder import kind_of

MB = 1 << 20
# Measured on x86-64 with onnxruntime 1.32 (tests/test_memory.py checks the sum against real peak RSS):
# Python with numpy, onnxruntime and tokenizers imported, before any model: 55 MB where the libraries were installed
# long ago, up to 70 MB right after `pip install` (fresh page-cache folios map in larger pieces); the middle:
RUNTIME_MB = 62
SESSION_MB = 10  # an onnxruntime session's own structures
PREPACK = 2.0  # onnxruntime keeps a prepacked copy of constant MatMul weights beside the originals
# fp32 weights in model.onnx.data: prepacked out of the mapped file, whose pages are then let go (a 166 MB model's
# peak RSS 314 MB mapped, 378 MB embedded). Quantized weights keep near 2x either way (int4 and int8: -4 to -6%).
PREPACK_MAPPED_FP32 = 1.25
TOKENIZER_PER_BYTE = 8  # a tokenizers.Tokenizer takes about 8 bytes of memory per byte of tokenizer.json


class MemoryBudgetError(RuntimeError):
    """The model would not fit; the message names the numbers and what to change."""


@dataclass(frozen=True)
class Estimate:
    weights_mb: float  # the session's weights: fp16 storage is cast to fp32, MatMul weights are prepacked
    tokenizer_mb: float  # the tokenizer's vocabulary and merges
    kv_mb: float  # keys and values of every layer at the full context (twice over where past and present differ)
    work_mb: float  # the largest transient buffers: a prefill chunk's logits, attention scores, MLP activations
    runtime_mb: float = RUNTIME_MB  # the interpreter and libraries
    context: int = 0  # the context length the estimate is for
    prefix_mb: float = 0  # the prefix cache's budget: snapshots of recent prompts' keys and values

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.tokenizer_mb + self.kv_mb + self.work_mb + self.runtime_mb + self.prefix_mb


def planned_context(manifest: dict, profile: Profile, requested: int | None) -> int:
    """The context a load plans for: the caller's, else the profile's default; never past the model's own."""
    return min(requested or profile.memory.default_context, manifest["model"]["context_length"])


def estimate(bundle: Bundle, context: int, prefix_mb: float = 0) -> Estimate:
    """Peak memory of loading the bundle and generating until `context` tokens are in the cache, with a prefix
    cache of `prefix_mb` full."""
    manifest = bundle.manifest
    shape, files = manifest["model"], manifest["files"]
    weights = weights_bytes(bundle) + SESSION_MB * MB
    tokenizer = TOKENIZER_PER_BYTE * files.get(manifest["tokenizer"]["file"], {}).get("size", 0)
    decoder = kind_of(manifest["onnx"])  # the graph kind's own figures
    kv = decoder.kv_bytes(shape, context)
    rows = decoder.logits_rows()
    logits = 3 * rows * shape["vocab_size"] * 4  # graph output, its copy and the float64 sampling copy
    scores = 2 * shape["num_heads"] * decoder.prefill_chunk * context * 4
    mlp = 4 * decoder.prefill_chunk * 4 * shape["hidden_size"] * 4
    return Estimate(weights / MB, tokenizer / MB, kv / MB, (logits + scores + mlp) / MB, context=context,
                    prefix_mb=prefix_mb)


def weights_bytes(bundle: Bundle) -> float:
    """The session's weights once prepacked (fp16 is widened to fp32 at load)."""
    names = bundle.model_files()
    stored = sum(bundle.manifest["files"][name]["size"] for name in names)
    method = bundle.manifest.get("quantization", {}).get("method")
    if method == "fp16":
        return 2 * PREPACK * stored
    mapped = len(names) > 1  # weights in model.onnx.data
    return (PREPACK_MAPPED_FP32 if mapped and method == "fp32" else PREPACK) * stored


def available_mb(profile: Profile, device: Device) -> tuple[float, str]:
    """The memory a model may take here, and what limits it."""
    limits = []
    if device.mem_available_mb:
        limits.append((device.mem_available_mb - profile.memory.reserve_mb, "free memory (MemAvailable) less the reserve"))
    if device.cgroup_limit_mb:
        limits.append((device.cgroup_limit_mb - profile.memory.reserve_mb, "this process's cgroup limit less the reserve"))
    if profile.memory.budget_mb:
        limits.append((profile.memory.budget_mb, f"profile {profile.name}'s budget"))
    return min(limits) if limits else (float("inf"), "no known limit")


def check(need: Estimate, profile: Profile, device: Device) -> None:
    have, limit = available_mb(profile, device)
    if need.total_mb <= have:
        return
    raise MemoryBudgetError(
        f"the model needs about {need.total_mb:.0f} MB (weights {need.weights_mb:.0f} + tokenizer "
        f"{need.tokenizer_mb:.0f} + KV cache {need.kv_mb:.0f} at {need.context} tokens + work {need.work_mb:.0f} "
        f"+ runtime {need.runtime_mb:.0f}{f' + prefix cache {need.prefix_mb:.0f}' if need.prefix_mb else ''}), "
        f"but {limit} allows {have:.0f} MB; try a smaller context (context_length / --context) or a smaller "
        f"quantization (edge export --quant int4)")
