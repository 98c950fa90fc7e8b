"""The wheels a board needs: the runtime's dependencies for another machine and Python, fetched by pip on this one.

One function, so that CI's ARM64 test bed (.ci/arm64-setup) and anything that installs edge-llm on a board pick
the same wheels: what CI runs under emulation is then what a board installs. pip's cross-platform download matches manylinux tags exactly, so every tag from
manylinux_2_17 up to the target's glibc is passed; versions are pinned to the ones this environment resolved (the
x86 side of a comparison then runs the same onnxruntime as the board); sdists are refused (a board has no compiler
to spare) and so are placeholder wheels that hold no code (pip picked an empty `llguidance 0.0.1` when given one
tag only).

usage: python -m edge.wheelhouse --machine aarch64 --python 3.11 --glibc 2.36 DEST
"""
from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "edge-llm"
OLDEST_GLIBC = 17  # manylinux_2_17 (manylinux2014): the oldest tag onnxruntime and numpy publish for aarch64


@dataclass(frozen=True)
class Target:
    """The machine and interpreter a wheelhouse is for."""

    machine: str = "aarch64"  # `uname -m` of the board's userland: aarch64 or x86_64
    python: str = "3.11"  # major.minor of the board's python3 (Raspberry Pi OS bookworm: 3.11)
    glibc: str = "2.36"  # the board's glibc (bookworm: 2.36; JetPack 6 / Ubuntu 22.04: 2.35)

    def platform_tags(self) -> list[str]:
        """manylinux_2_17 .. manylinux_2_<glibc> for the machine, newest first, with the 2014 alias of 2_17."""
        match = re.fullmatch(r"2\.(\d+)", self.glibc)
        if not match:
            raise ValueError(f"glibc {self.glibc!r}: give it as 2.N, e.g. 2.36 (`ldd --version` on the board)")
        minor = int(match.group(1))
        if minor < OLDEST_GLIBC:
            raise ValueError(f"glibc {self.glibc} is older than 2.{OLDEST_GLIBC}: onnxruntime has no wheels for it")
        tags = [f"manylinux_2_{m}_{self.machine}" for m in range(minor, OLDEST_GLIBC - 1, -1)]
        return tags + [f"manylinux2014_{self.machine}"]


def requirements(target: Target | None = None, distribution: str = DISTRIBUTION) -> list[str]:
    """The runtime's own requirements (no extras), as this installed distribution declares them, with markers
    decided for the target's Python (pip would decide them for this one: a 3.10 board needs tomli, a 3.11 host not)."""
    declared = [r for r in metadata.requires(distribution) or [] if not re.search(r"\bextra\s*==", r)]
    if target is None:
        return declared
    from packaging.requirements import Requirement  # onnxruntime's dependency, so present wherever this runs

    environment = {"python_version": target.python, "python_full_version": f"{target.python}.0",
                   "platform_machine": target.machine, "sys_platform": "linux", "platform_system": "Linux"}
    chosen = []
    for text in declared:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(environment):
            req.marker = None
            chosen.append(str(req))
    return chosen


def selection(target: Target) -> list[str]:
    """What a board's wheelhouse holds: the runtime's requirements, and pip, with which a board makes the venv
    from the wheelhouse needing neither a network nor ensurepip."""
    return requirements(target) + ["pip"]


def host_pins() -> list[str]:
    """name==version of every installed distribution: the versions this environment resolved."""
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        key = re.sub(r"[-_.]+", "-", name or "").lower()  # PEP 503: edge_llm and edge-llm are one name
        if name and key not in pins and key != DISTRIBUTION:
            pins[key] = f"{name}=={dist.version}"
    return sorted(pins.values())


def download_command(target: Target, dest: Path, reqs: list[str], constraints: Path) -> list[str]:
    platforms = [arg for tag in target.platform_tags() for arg in ("--platform", tag)]
    return [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "on",
            "--only-binary=:all:", "--implementation", "cp", "--python-version", target.python, *platforms,
            "-c", str(constraints), "-d", str(dest), *reqs]


def download(target: Target, dest: Path, reqs: list[str] | None = None) -> list[Path]:
    """Fetch the wheels into dest (pip shows its progress) and check them; the list of wheels."""
    dest.mkdir(parents=True, exist_ok=True)
    reqs = selection(target) if reqs is None else reqs
    constraints = dest / "constraints.txt"
    constraints.write_text("\n".join(host_pins()) + "\n")
    done = subprocess.run(download_command(target, dest, reqs, constraints))
    if done.returncode != 0:
        raise RuntimeError(f"pip could not fetch wheels for {target}: see its output above")
    return check(dest, target)


def check(dest: Path, target: Target) -> list[Path]:
    """Refuse anything that is not a wheel for the target, and wheels with nothing in them but metadata."""
    found = sorted(p for p in dest.iterdir() if p.is_file() and p.name != "constraints.txt"
                   and not p.name.startswith("."))  # a caller's stamp files
    wrong = [p.name for p in found if p.suffix != ".whl"]
    if wrong:
        raise RuntimeError(f"not wheels (a board builds nothing): {', '.join(wrong)}")
    for wheel in found:
        python, abi, tags = wheel.stem.split("-")[-3:]
        if not (tags == "any" or target.machine in tags):
            raise RuntimeError(f"{wheel.name} is not for {target.machine}")
        if not _fits_python(python.split("."), abi, target.python):
            raise RuntimeError(f"{wheel.name} is not for Python {target.python}")
        with zipfile.ZipFile(wheel) as z:
            code = [n for n in z.namelist() if not re.match(r"[^/]+\.dist-info/", n)]
        if not code:
            raise RuntimeError(f"{wheel.name} is a placeholder that holds no code")
    return found


def key(target: Target) -> str:
    """What a wheelhouse depends on (target, requirements, this environment's versions): a cached one whose key
    differs is stale, e.g. after this environment's onnxruntime moved on."""
    text = "\n".join([repr(target), *selection(target), *host_pins()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fits_python(tags: list[str], abi: str, python: str) -> bool:
    """A wheel's python tags against major.minor: py3 for any, cpXY for that one, cpXY with abi3 for XY and later."""
    want = int(python.replace(".", "")[1:] or 0)
    for tag in tags:
        if tag in ("py3", "py2.py3") or tag.startswith("py3"):
            return True
        if tag.startswith("cp3") and tag[3:].isdigit():
            if int(tag[3:]) == want or (abi == "abi3" and int(tag[3:]) <= want):
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.wheelhouse", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder the wheels are written to")
    parser.add_argument("--machine", default=Target.machine, help="aarch64 or x86_64 (default: %(default)s)")
    parser.add_argument("--python", default=Target.python,
                        help="the board's Python, major.minor (default: %(default)s)")
    parser.add_argument("--glibc", default=Target.glibc, help="the board's glibc (default: %(default)s)")
    parser.add_argument("--key", action="store_true", help="print what the wheelhouse depends on and fetch nothing")
    args = parser.parse_args(argv)
    target = Target(args.machine, args.python, args.glibc)
    try:
        if args.key:
            print(key(target))
            return 0
        wheels = download(target, args.dest)
    except (ValueError, RuntimeError) as e:
        print(f"edge.wheelhouse: error: {e}", file=sys.stderr)
        return 1
    print(f"{len(wheels)} wheels in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
