"""`edge doctor`: what this board is, which profile and providers would be used and why, and what to worry about."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from edge import hugepages, memory
from edge.devices import Device, Profile, read_device, resolve, unsupported_userland
from edge.kernels import describe, kernel_path, method_of
from edge.bundle import BundleError, open_bundle
from edge.engine import resolve as resolve_bundle
from edge.session import MIN_ONNXRUNTIME, onnxruntime_version, too_old_for, usable


def report(root: str | Path = "/", bundle: str | Path | None = None, profile: str = "auto",
           context: int | None = None) -> tuple[list[str], list[str]]:
    """(lines describing the device, profile, providers and bundle; warnings)."""
    device = read_device(root)
    have = tuple(ort.get_available_providers())
    choice = resolve(profile, device, have)
    chosen, why = choice.profile, choice.reason
    lines = describe_device(device) + [f"profile: {chosen.name} ({why})", hugepages.describe(chosen.memory.huge_pages)]
    lines += describe_providers(chosen, have)
    lines.append(f"int4 kernels (a default export, accuracy level 4): {describe(kernel_path(device))}")
    warnings = device_warnings(device, chosen)
    if bundle is not None:
        more_lines, more_warnings = describe_bundle(Path(bundle), chosen, device, context)
        lines += more_lines
        warnings += more_warnings
    return lines, warnings


def describe_device(d: Device) -> list[str]:
    cpus = ", ".join(d.cpu_names) or "?"
    return [
        f"read under: {d.root}",
        f"architecture: {d.arch or '?'}; model: {d.model or '-'}",
        f"device-tree compatible: {', '.join(d.compatible) or '-'}",
        f"userland: {d.userland or '?'}",
        f"CPU: {d.cores or '?'} cores ({cpus}); int8 dot-product instructions: {'yes' if d.dot_product else 'no'}",
        f"L4T release: {d.l4t or d.tegra_release or '-'}",
        f"memory: total {d.mem_total_mb} MB, available {d.mem_available_mb} MB, "
        f"cgroup limit {str(d.cgroup_limit_mb) + ' MB' if d.cgroup_limit_mb else 'none'}",
    ]


def describe_providers(profile: Profile, have: tuple[str, ...]) -> list[str]:
    used = [name for name, _ in usable(profile, have)]
    return [
        f"profile wants: {', '.join(profile.provider_names)}",
        f"onnxruntime {ort.__version__} on this machine has: {', '.join(have)}",
        f"would use: {', '.join(used)} (read back from the session when a model loads)",
    ]


def device_warnings(device: Device, profile: Profile) -> list[str]:
    warnings = [why for why in [unsupported_userland(device)] if why]
    if onnxruntime_version() < MIN_ONNXRUNTIME:
        warnings.append(f"onnxruntime {ort.__version__} is older than {'.'.join(map(str, MIN_ONNXRUNTIME))}: "
                        f"int4/int8 bundles will not load")
    missing = [p for p in profile.provider_names if p not in ort.get_available_providers()]
    if missing:
        warnings.append(f"{', '.join(missing)} not in this onnxruntime build: {profile.name} falls back to the CPU")
    return warnings


def describe_bundle(path: Path, profile: Profile, device: Device, context: int | None) -> tuple[list[str], list[str]]:
    try:
        bundle = open_bundle(resolve_bundle(path), verify="none")
    except BundleError as e:
        return [], [str(e)]
    manifest = bundle.manifest
    quant = manifest.get("quantization", {})
    target = (manifest.get("target") or {}).get("profile")
    context = memory.planned_context(manifest, profile, context)
    need = memory.estimate(bundle, context)
    have, limit = memory.available_mb(profile, device)
    lines = [f"bundle: {path} ({manifest['family']}, {quant.get('method', '?')}, "
             f"accuracy level {quant.get('accuracy_level', 0)}, exported for {target or 'no particular board'})",
             f"memory at {context} tokens: about {need.total_mb:.0f} MB needed; {limit} allows "
             f"{'unlimited' if have == float('inf') else f'{have:.0f} MB'}",
             f"kernels for this bundle: {describe(bundle_kernels(manifest, profile, device))}"]
    prefix = profile.memory.prefix_cache_mb
    if prefix:
        fits = memory.estimate(bundle, context, prefix).total_mb <= have
        lines.append(f"prefix cache: the profile's {prefix} MB " + ("fit beside it" if fits else
                     "do not fit beside it: it is off at load (--prefix-cache MB for a smaller one)"))
    warnings = []
    if need.total_mb > have:
        warnings.append(f"the model is over the memory budget ({need.total_mb:.0f} > {have:.0f} MB): "
                        f"use a smaller context or quantization")
    if too_old_for(manifest["onnx"].get("min_onnxruntime")):
        warnings.append(f"the bundle needs onnxruntime >= {manifest['onnx']['min_onnxruntime']} (sliding-window "
                        f"attention); this is {ort.__version__}")
    if target and target != profile.name:
        warnings.append(f"the bundle was exported for {target}, this board uses {profile.name}")
    return lines, warnings


def bundle_kernels(manifest: dict, profile: Profile, device: Device):
    """The kernel path of a bundle under the profile's first execution provider that this onnxruntime has."""
    quant = manifest.get("quantization", {})
    used = usable(profile, tuple(ort.get_available_providers()))
    return kernel_path(device, method_of(quant), quant.get("accuracy_level", 0),
                       used[0][0] if used else "CPUExecutionProvider")
