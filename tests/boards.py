"""Fake device roots with the strings real boards report, each with where it comes from.

Sources (as found; "torvalds" is the mainline Linux repository):
- Pi 4: torvalds arch/arm/boot/dts/broadcom/bcm2711-rpi-4-b.dts (model "Raspberry Pi 4 Model B", compatible
  "raspberrypi,4-model-b", "brcm,bcm2711"); real boards append "Rev 1.x" (github.com/nebrius/raspi-board issue 20);
  cpuinfo with part 0xd08 and Features "fp asimd evtstrm crc32 cpuid" from adafruit/Adafruit_Python_PlatformDetect
  PR 87 and fastfetch-cli/fastfetch issue 1529.
- Pi 5: raspberrypi/linux arch/arm64/boot/dts/broadcom/bcm2712-rpi-5-b.dts (model "Raspberry Pi 5", compatible
  "raspberrypi,5-model-b", "brcm,bcm2712"); cpuinfo (part 0xd0b, Features with asimddp, "Model : Raspberry Pi 5
  Model B Rev 1.0") from hrw/arm-socs-table issue 96.
- Jetson Nano: NVIDIA L4T R32 tegra210-p3448-0000-p3449-0000-b00.dts (vendor copy in alliedvision/
  linux_nvidia_jetson): model "NVIDIA Jetson Nano Developer Kit", compatible "nvidia,p3449-0000-b00+p3448-0000-b00",
  "nvidia,jetson-nano", "nvidia,tegra210"; mainline torvalds tegra210-p3450-0000.dts: "nvidia,p3450-0000",
  "nvidia,tegra210"; cpuinfo part 0xd07, Features "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid" (hrw/arm-socs-
  table issues 37 and 91); release line "BOARD: t210ref" as in rbonghi/jetson_stats issue 48.
- Orin Nano: L4T R35 tegra234-p3767-0003-p3768-0000-a0.dts (alliedvision/linux_nvidia_jetson): model "NVIDIA Orin
  Nano Developer Kit" (also in jetson_stats issue 514); mainline torvalds tegra234-p3768-0000+p3767-0005.dts: "NVIDIA
  Jetson Orin Nano Developer Kit", "nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234".
- Orin NX: L4T R35 tegra234-p3767-0000-p3768-0000-a0.dts: "NVIDIA Orin NX Developer Kit", "nvidia,p3768-0000+
  p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234", "nvidia,tegra23x"; mainline model "NVIDIA Jetson Orin NX
  Engineering Reference Developer Kit" (also seen on L4T 36.4.3, jetson_stats issue 603).
- AGX Orin: L4T R35 tegra234-p3701-0000-p3737-0000.dts: "Jetson AGX Orin", "nvidia,p3737-0000+p3701-0000",
  "nvidia,tegra234", "nvidia,tegra23x" (jetson_stats issue 617); 64 GB module "nvidia,p3737-0000+p3701-0005",
  "nvidia,p3701-0005", "nvidia,tegra234", "nvidia,tegra23x" (NVIDIA/jetson-gpio issue 125).
- Orin cpuinfo: part 0xd42 (NVIDIA's "arm64: dts: tegra234: Fix CPU compatible string to cortex-a78ae" patch),
  Features as lscpu prints them on an AGX Orin (hu-po/warp-ik docs/specs/arm-agx.md).
- nv_tegra_release R35: dusty-nv/jetson-containers jetson_containers/l4t_version.py. The R32 (t210ref, 32.7.1) and
  R36 (4.7) lines are as they appear in indexed public files whose repository could not be named; jetson-containers
  writes R36 lines in the same format with BOARD: generic.
- Part numbers: torvalds arch/arm64/include/asm/cputype.h (A57 0xd07, A72 0xd08, A76 0xd0b, A78AE 0xd42).
"""
from __future__ import annotations

from pathlib import Path

A72 = ("0xd08", "0x0", "3", "fp asimd evtstrm crc32 cpuid")
A76 = ("0xd0b", "0x4", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
       "dcpop asimddp")
A57 = ("0xd07", "0x1", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid")
A78AE = ("0xd42", "0x0", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
         "dcpop asimddp uscat ilrcpc flagm paca pacg")
X86_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma sse4_1 sse4_2 avx avx2"

# name -> (expected profile, model, compatible, cpu, cores, Model line, nv_tegra_release, MemTotal MB)
BOARDS = {
    "pi4": ("raspberry-pi-4", "Raspberry Pi 4 Model B Rev 1.4", ["raspberrypi,4-model-b", "brcm,bcm2711"], A72, 4,
            "Raspberry Pi 4 Model B Rev 1.4", None, 3796),
    "pi5": ("raspberry-pi-5", "Raspberry Pi 5 Model B Rev 1.0", ["raspberrypi,5-model-b", "brcm,bcm2712"], A76, 4,
            "Raspberry Pi 5 Model B Rev 1.0", None, 8053),
    "jetson-nano-l4t": ("jetson-nano", "NVIDIA Jetson Nano Developer Kit",
                        ["nvidia,p3449-0000-b00+p3448-0000-b00", "nvidia,jetson-nano", "nvidia,tegra210"], A57, 4, None,
                        "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
                        "DATE: Sat Feb 19 17:05:08 UTC 2022", 3964),
    "jetson-nano-mainline": ("jetson-nano", "NVIDIA Jetson Nano Developer Kit", ["nvidia,p3450-0000", "nvidia,tegra210"],
                             A57, 4, None, None, 3964),
    "orin-nano-r35": ("jetson-orin-nano", "NVIDIA Orin Nano Developer Kit",
                      ["nvidia,p3768-0000+p3767-0003", "nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0003",
                       "nvidia,p3767-0005", "nvidia,tegra234", "nvidia,tegra23x"], A78AE, 6, None,
                      "# R35 (release), REVISION: 3.1, GCID: 32790763, BOARD: t186ref, EABI: aarch64, "
                      "DATE: Wed Mar 15 07:54:12 UTC 2023", 7620),
    "orin-nano-mainline": ("jetson-orin-nano", "NVIDIA Jetson Orin Nano Developer Kit",
                           ["nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"], A78AE, 6, None,
                           "# R36 (release), REVISION: 4.7, GCID: 42132812, BOARD: generic, EABI: aarch64, "
                           "DATE: Thu Sep 18 22:54:44 UTC 2025", 7620),
    "orin-nx": ("jetson-orin-nx", "NVIDIA Orin NX Developer Kit",
                ["nvidia,p3768-0000+p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234", "nvidia,tegra23x"], A78AE, 8,
                None, "# R35 (release), REVISION: 3.1, GCID: 32790763, BOARD: t186ref, EABI: aarch64, "
                "DATE: Wed Mar 15 07:54:12 UTC 2023", 15656),
    "agx-orin": ("jetson-agx-orin", "Jetson AGX Orin", ["nvidia,p3737-0000+p3701-0000", "nvidia,tegra234",
                                                        "nvidia,tegra23x"], A78AE, 12, None,
                 "# R35 (release), REVISION: 3.1, GCID: 32790763, BOARD: t186ref, EABI: aarch64, "
                 "DATE: Wed Mar 15 07:54:12 UTC 2023", 30536),
    "agx-orin-64gb": ("jetson-agx-orin", "NVIDIA Jetson AGX Orin Developer Kit",
                      ["nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234", "nvidia,tegra23x"],
                      A78AE, 12, None, None, 62800),
    # Not a supported board: a Rockchip RK3399 SBC (torvalds rk3399-rockpro64.dts) -> generic-arm64.
    "rockpro64": ("generic-arm64", "Pine64 RockPro64 v2.1", ["pine64,rockpro64-v2.1", "pine64,rockpro64",
                                                             "rockchip,rk3399"], A72, 6, None, None, 3873),
    # A Pi-4 CPU part without any device tree (a VM or container on an A72 server): never a Pi by CPU alone.
    "a72-server": ("generic-arm64", "", [], A72, 16, None, None, 32000),
    "x86-pc": ("generic-x86-64", "", [], None, 8, None, None, 16000),
}


ELF_HEADERS = {  # EI_CLASS (1: 32-bit, 2: 64-bit) and e_machine of an ELF program, as `readelf -h` reads them
    "aarch64": (2, 0xB7), "armv7l": (1, 0x28), "x86_64": (2, 0x3E)}


def write_root(root: Path, name: str, mem_available_mb: int | None = None, cgroup_limit_mb: int | None = None,
               userland: str | None = None) -> Path:
    """A folder laid out like `/` on the board: proc/device-tree, proc/cpuinfo, proc/meminfo, etc/nv_tegra_release,
    and with `userland` a usr/bin/python3 whose ELF header says what its programs are built for."""
    _, model, compatible, cpu, cores, model_line, release, mem_total = BOARDS[name]
    if model:
        _write(root / "proc/device-tree/model", model + "\0")
        _write(root / "proc/device-tree/compatible", "".join(c + "\0" for c in compatible))
    _write(root / "proc/cpuinfo", _cpuinfo(cpu, cores, model_line))
    available = mem_available_mb if mem_available_mb is not None else mem_total * 3 // 4
    _write(root / "proc/meminfo", f"MemTotal:       {mem_total * 1024} kB\nMemFree:        {available * 900} kB\n"
                                  f"MemAvailable:   {available * 1024} kB\n")
    if release:
        _write(root / "etc/nv_tegra_release", release + "\n")
    if cgroup_limit_mb:
        _write(root / "proc/self/cgroup", "0::/edge.slice\n")
        _write(root / "sys/fs/cgroup/edge.slice/memory.max", f"{cgroup_limit_mb << 20}\n")
    if userland:
        bits, machine = ELF_HEADERS[userland]
        header = b"\x7fELF" + bytes([bits, 1, 1]) + bytes(9) + (2).to_bytes(2, "little") + machine.to_bytes(2, "little")
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        (root / "usr/bin/python3").write_bytes(header + bytes(44))
    return root


def _cpuinfo(cpu, cores: int, model_line: str | None) -> str:
    if cpu is None:  # x86-64
        block = "vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core(TM) i5-8250U CPU @ 1.60GHz\nflags\t\t: {}\n"
        return "\n".join(f"processor\t: {i}\n" + block.format(X86_FLAGS) for i in range(cores))
    part, variant, revision, features = cpu
    block = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: " + features + "\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU variant\t: " + variant + "\nCPU part\t: " + part + "\nCPU revision\t: "
             + revision + "\n")
    text = "\n".join(block.format(i=i) for i in range(cores))
    return text + (f"\nRevision\t: c03114\nSerial\t\t: 10000000deadbeef\nModel\t\t: {model_line}\n" if model_line else "")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
