"""Which int4 matrix kernels onnxruntime runs for a bundle on this CPU, and why: for `edge doctor` and
`edge run --verbose`.

Every int4 export asks for int8 activations (MatMulNBits accuracy level 4). That is a request, not a demand:
onnxruntime's MLAS takes its int8 kernels only where the CPU has the instructions for them and otherwise computes
in fp32 from the same weights (`GetComputeType` in onnxruntime's matmul_nbits.cc; on ARM the int8 kernels are
installed only where the CPU has dot-product instructions). So a level-4 bundle gives a Pi 4 (Cortex-A72) exactly
the fp32 results and speed of a level-0 bundle, and a Pi 5 (Cortex-A76) or an x86 CPU with VNNI the int8 speed-up;
CI shows both under emulation (tests/test_arm64.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from edge.devices import Device


@dataclass(frozen=True)
class KernelPath:
    compute: str  # "int8" (activations quantized per block, integer dot products), "fp32", or "provider"
    kernels: str  # the instruction set the kernels use, in words
    why: str  # what in the bundle or the CPU decides it


def kernel_path(device: Device, method: str = "int4", accuracy_level: int = 4,
                provider: str = "CPUExecutionProvider") -> KernelPath:
    """The matrix kernel path for a bundle of this quantization (method_of) on this device and execution provider:
    4- and 8-bit MatMulNBits take the same int8-or-fp32 decision."""
    if provider != "CPUExecutionProvider":
        name = provider.replace("ExecutionProvider", "")
        return KernelPath("provider", f"{name} kernels", f"{name} runs the matrix products; accuracy level is a CPU "
                                                          "setting")
    if method not in ("int4", "int8"):  # int8-dynamic: MatMulInteger, always int8 (bundles before the presets)
        return KernelPath("fp32" if method in ("fp32", "fp16") else "int8", _simd(device),
                          f"this {method} bundle has no int4 matrix products")
    if accuracy_level != 4:
        return KernelPath("fp32", _simd(device), f"the bundle asks for fp32 compute (accuracy level "
                                                 f"{accuracy_level}); re-export it to let the CPU use int8 kernels")
    return _int8_or_fallback(device)


def method_of(quantization: dict) -> str:
    """The manifest's method in kernel terms: a preset's MatMulNBits (4 or 8 bits) or an older bundle's dynamic
    int8 (written before the presets, with no "preset" key)."""
    method = quantization.get("method", "fp32")
    return "int8-dynamic" if method == "int8" and "preset" not in quantization else method


def _int8_or_fallback(device: Device) -> KernelPath:
    f = device.features
    if device.arch == "aarch64":
        if "asimddp" in f:
            extra = " and I8MM (SMMLA) for prompts" if "i8mm" in f else ""
            return KernelPath("int8", f"NEON dot-product (SDOT){extra}", "the CPU reports asimddp")
        return KernelPath("fp32", "NEON fp32", "the CPU has no dot-product instructions (no asimddp, as on a "
                                               "Cortex-A72 or A53): onnxruntime computes the level-4 bundle in fp32, "
                                               "with the results and speed of a level-0 one")
    if device.arch == "x86_64":
        for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx512vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")):
            if flag in f:
                return KernelPath("int8", name, f"the CPU reports {flag}")
        if "avx2" in f:
            return KernelPath("int8", "AVX2", "the CPU reports avx2 but no VNNI: int8 products through AVX2")
        return KernelPath("fp32", "SSE fp32", "the CPU has no AVX2, which onnxruntime's int4 kernels need")
    return KernelPath("fp32", "generic", f"no int8 kernels are known for architecture {device.arch or '?'}")


def _simd(device: Device) -> str:
    return {"aarch64": "NEON", "x86_64": "AVX2" if "avx2" in device.features else "SSE"}.get(device.arch, "generic")


def describe(path: KernelPath) -> str:
    compute = {"int8": "int8 activations", "fp32": "fp32 compute", "provider": "execution provider"}[path.compute]
    return f"{compute} with {path.kernels} ({path.why})"
