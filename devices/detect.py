"""What board is this? Read the device tree, cpuinfo, the L4T release file and meminfo (under any root, so an
SD-card image or a test's fake tree can stand in for `/`), then pick the matching profile."""
from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge.devices.profiles import Profile, all_profiles, load_profile

ARM_PARTS = {"0xd03": "Cortex-A53", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76",
             "0xd42": "Cortex-A78AE", "0xd05": "Cortex-A55", "0xd41": "Cortex-A78"}
LITTLE_CORES = {"0xd03", "0xd05", "0xd04"}  # efficiency cores: not counted as performance cores


@dataclass(frozen=True)
class Device:
    """What the files under a root say about the machine."""

    root: str = "/"
    arch: str = ""  # "aarch64" or "x86_64"
    model: str = ""  # /proc/device-tree/model
    compatible: tuple[str, ...] = ()  # /proc/device-tree/compatible
    cpu_parts: tuple[str, ...] = ()  # "CPU part" of each ARM core
    cpu_model: str = ""  # "model name" of x86 (and some ARM) cpuinfo
    features: frozenset[str] = field(default_factory=frozenset)  # cpuinfo Features (ARM) or flags (x86)
    cores: int = 0  # processors listed in cpuinfo
    performance_cores: int = 0  # cores that are not little/efficiency cores
    tegra_release: str = ""  # the first line of /etc/nv_tegra_release
    mem_total_mb: int = 0  # MemTotal
    mem_available_mb: int = 0  # MemAvailable
    cgroup_limit_mb: int = 0  # memory.max (v2) or memory.limit_in_bytes (v1) of this process's cgroup; 0 = none
    userland: str = ""  # the machine the programs are built for (aarch64, armv7l, x86_64, i686): on a 64-bit
    # kernel it can still be 32-bit ARM, for which onnxruntime publishes no wheels

    @property
    def dot_product(self) -> bool:
        """int8 dot-product instructions: ARM asimddp, x86 AVX-VNNI or AVX-512 VNNI."""
        return bool(self.features & {"asimddp", "avx_vnni", "avx512_vnni", "avx512vnni"})

    @property
    def l4t(self) -> str:
        """The L4T version, e.g. "R36.4.7", from "# R36 (release), REVISION: 4.7, ..."; "" when not a Jetson."""
        m = re.match(r"#\s*(R\d+) \(release\), REVISION: ([\d.]+)", self.tegra_release)
        return f"{m.group(1)}.{m.group(2)}" if m else ""

    @property
    def cpu_names(self) -> list[str]:
        return sorted({ARM_PARTS.get(p, p) for p in self.cpu_parts}) or ([self.cpu_model] if self.cpu_model else [])


def read_device(root: str | Path = "/") -> Device:
    root = Path(root)
    cpuinfo = _read(root / "proc/cpuinfo")
    parts = tuple(re.findall(r"^CPU part\s*:\s*(0x[0-9a-fA-F]+)", cpuinfo, re.M))
    cores = len(re.findall(r"^processor\s*:", cpuinfo, re.M))
    meminfo = _meminfo(_read(root / "proc/meminfo"))
    cpu_model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    return Device(
        root=str(root), arch=_arch(cpuinfo, root), model=_read(root / "proc/device-tree/model").strip("\0\n "),
        compatible=tuple(c for c in _read(root / "proc/device-tree/compatible").split("\0") if c),
        cpu_parts=tuple(p.lower() for p in parts), cpu_model=cpu_model.group(1).strip() if cpu_model else "", features=_features(cpuinfo), cores=cores,
        performance_cores=sum(p.lower() not in LITTLE_CORES for p in parts) if parts else cores,
        tegra_release=_read(root / "etc/nv_tegra_release").split("\n", 1)[0].strip(),
        mem_total_mb=meminfo.get("MemTotal", 0), mem_available_mb=meminfo.get("MemAvailable", 0),
        cgroup_limit_mb=_cgroup_limit(root), userland=_userland(root),
    )


# (EI_CLASS, e_machine) -> `uname -m` style name: the header names the userland's ABI, which no /proc file does
ELF_MACHINES = {(2, 0xB7): "aarch64", (1, 0x28): "armv7l", (2, 0x3E): "x86_64", (1, 0x03): "i686"}


def _userland(root: Path) -> str:
    """What this interpreter (under "/") or the root's python3 / sh is built for, from its ELF header: `uname -m`
    names the kernel, which says aarch64 under a 32-bit Raspberry Pi OS too."""
    candidates = [Path(sys.executable)] if str(root) == "/" else []
    candidates += [root / "usr/bin/python3", root / "bin/sh", root / "usr/bin/sh"]
    for path in candidates:
        try:
            with open(path, "rb") as f:
                head = f.read(20)
        except OSError:
            continue
        if len(head) == 20 and head[:4] == b"\x7fELF":
            return ELF_MACHINES.get((head[4], int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")),
                                    "unknown")
    return ""


def unsupported_userland(device: Device) -> str | None:
    """Why edge-llm cannot run on this userland, in words a user can act on; None where it can."""
    if device.userland in ("armv7l", "i686"):
        cpu = f" (the CPU itself is {device.arch})" if device.arch in ("aarch64", "x86_64") else ""
        return (f"this is a 32-bit ({device.userland}) userland{cpu}: onnxruntime publishes no 32-bit wheels, so "
                "edge-llm cannot run here; install a 64-bit OS (e.g. Raspberry Pi OS 64-bit, arm64)")
    return None


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _arch(cpuinfo: str, root: Path) -> str:
    if re.search(r"^CPU implementer", cpuinfo, re.M):
        return "aarch64"
    if re.search(r"^vendor_id", cpuinfo, re.M):
        return "x86_64"
    machine = platform.machine().lower() if str(root) == "/" else ""
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


def _features(cpuinfo: str) -> frozenset[str]:
    match = re.search(r"^(?:Features|flags)\s*:(.*)$", cpuinfo, re.M)
    return frozenset(match.group(1).split()) if match else frozenset()


def _meminfo(text: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) // 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}


def _cgroup_limit(root: Path) -> int:
    """The memory limit of this process's cgroup in MB, v2 or v1; 0 when there is none."""
    cgroups = _read(root / "proc/self/cgroup")
    v2 = re.search(r"^0::(/\S*)$", cgroups, re.M)
    v1 = re.search(r"^\d+:memory:(/\S*)$", cgroups, re.M)
    candidates = []
    if v2:
        candidates += [f"sys/fs/cgroup{v2.group(1).rstrip('/')}/memory.max"]
    if v1:
        candidates += [f"sys/fs/cgroup/memory{v1.group(1).rstrip('/')}/memory.limit_in_bytes"]
    candidates += ["sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory/memory.limit_in_bytes"]
    for name in candidates:
        value = _read(root / name).strip()
        if value.isdigit() and int(value) < 1 << 60:  # v1 reports "no limit" as a huge number
            return int(value) >> 20
    return 0


@dataclass(frozen=True)
class Choice:
    profile: Profile
    reason: str  # why this profile, in words for `edge doctor`


def choose_profile(device: Device, gpu: bool = False, profiles: list[Profile] | None = None) -> Choice:
    """The board's own profile, else the GPU profile where CUDA is offered, else the generic one for the arch."""
    profiles = profiles if profiles is not None else all_profiles()
    scored = [(score, reason, p) for p in profiles for score, reason in [_score(p, device)] if score > 0]
    if scored:
        score, reason, profile = max(scored, key=lambda s: s[0])
        return Choice(profile, reason)
    if gpu:
        for p in profiles:
            if p.match.needs_gpu and p.match.arch in ("", device.arch):
                return Choice(p, "no known board; onnxruntime offers CUDA, so the desktop GPU profile")
    for p in profiles:
        if p.match.generic and p.match.arch == device.arch:
            return Choice(p, f"no known board; the generic profile for {device.arch}")
    cpu = next(p for p in profiles if p.name == "cpu")
    return Choice(cpu, f"unknown architecture {device.arch or '?'}; the plain CPU profile")


def _score(profile: Profile, device: Device) -> tuple[int, str]:
    """Board evidence, strongest first: a compatible string, then the model name; a matching L4T release or CPU
    part adds to it. A CPU part alone never picks a board (many boards share a core)."""
    m = profile.match
    if m.generic or m.needs_gpu or (m.arch and device.arch and m.arch != device.arch):
        return 0, ""
    hits = [c for c in device.compatible if c in m.dt_compatible]
    score = 100 * len(hits)
    reasons = [f"device-tree compatible {hits[0]!r}"] if hits else []
    if any(s in device.model for s in m.dt_model):
        score += 10
        reasons.append(f"model {device.model!r}")
    if score and m.tegra_release and any(device.tegra_release.startswith(f"# {r}") for r in m.tegra_release):
        score += 5
        reasons.append(f"L4T {device.l4t}")
    if score and set(device.cpu_parts) & set(m.cpu_parts):
        score += 1
    return score, ", ".join(reasons)


def resolve(spec: str | Path | Profile = "auto", device: Device | None = None,
            available: tuple[str, ...] = ()) -> Choice:
    """A profile from "auto" (detection), a bundled name, a .toml path, or a Profile as is."""
    if isinstance(spec, Profile):
        return Choice(spec, "given by the caller")
    if str(spec) != "auto":
        return Choice(load_profile(spec), "asked for by name")
    device = device or read_device()
    return choose_profile(device, gpu="CUDAExecutionProvider" in available)
