"""`edge pack`: everything a board needs to run a bundle with no network, in one archive (edge/archive.py): the
bundle, the board's profile, the runtime's wheels for the board's machine and Python (edge/wheelhouse.py: the same
selection CI's ARM64 tests install), the edge-llm wheel itself, an install script and the systemd unit
(edge/service.py; its prefix, @PREFIX@, is filled in by the install).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edge import archive, service, wheelhouse
from edge.devices import Profile, load_profile

OLDEST_PYTHON = (3, 10)  # onnxruntime >= 1.23 publishes wheels for 3.10 and newer
TOO_OLD = {"3.6": "JetPack 4 (Jetson Nano)", "3.8": "JetPack 5", "3.7": "Debian buster", "3.9": "Debian bullseye"}
MACHINES = ("aarch64", "x86_64")  # a profile's match.arch, which is also the wheels' machine tag
PREFIX = "@PREFIX@"  # where the unit's paths start; `edge install` writes its --prefix there

INSTALL_SH = """#!/bin/sh
# Installs this edge-llm pack with the board's own python3 and no network:
#     tar -xOf PACK.tar install.sh | sh -s -- PACK.tar [--prefix /opt/edge-llm]
# The installer is the packed edge-llm wheel (pure Python, run from the zip, after its checksum is compared with
# the manifest's); it checks every member of the pack before it writes anything. This script proves the pack is
# whole, not who made it: for signed packs use an edge-llm the board already trusts (edge install --trust KEY).
set -eu
exec python3 - "$@" <<'PY'
import hashlib, json, os, sys, tarfile, tempfile
pack = sys.argv[1]
if "--trust" in sys.argv:
    sys.exit("install.sh: a pack cannot vouch for itself; "
             "check signatures with an installed edge: edge install --trust")
with tarfile.open(pack) as tar:
    manifest = json.loads(tar.extractfile("edge-pack.json").read())
    name = "wheels/" + manifest["runtime_wheel"]
    data = tar.extractfile(name).read()
if hashlib.sha256(data).hexdigest() != manifest["members"][name]["sha256"]:
    sys.exit(f"install.sh: {name} does not match its checksum: the pack is damaged")
runtime = os.path.join(tempfile.mkdtemp(prefix="edge-install-"), "edge_llm.whl")
with open(runtime, "wb") as out:
    out.write(data)
sys.path.insert(0, runtime)
from edge.install import main
sys.exit(main(sys.argv[1:]))
PY
"""


class PackError(ValueError):
    """A pack that cannot be made as asked; nothing was written."""


def pack(bundle: Path, profile: str, out: Path, python: str | None = None, glibc: str | None = None,
         wheels: Path | None = None, runtime_wheel: Path | None = None, memory_mb: int | None = None,
         sign_key: Path | None = None, bundle_only: bool = False, onnxruntime_wheel: Path | None = None) -> dict:
    """Write the archive at out; returns its manifest.

    bundle_only: just the bundle, profile and unit, for boards that have a version installed: `edge install`
    reuses that version's environment (a new model without moving 50 MB of wheels again).
    onnxruntime_wheel: for GPU profiles (Jetson), the onnxruntime-gpu wheel the user has (NVIDIA's L4T builds are
    not on the package index); without it the board's own onnxruntime is used (a venv with system site packages).

    wheels: a folder of already fetched wheels for the target (else pip fetches them, showing its progress);
    runtime_wheel: edge-llm's own wheel (else built from this checkout); memory_mb: the board's RAM (else the
    profile's budget), for the check that the bundle fits at the profile's default context."""
    from edge.bundle import open_bundle
    from edge.engine import resolve

    bundle = resolve(bundle)  # "demo" too
    chosen = load_profile(profile)
    target = _target(chosen, python, glibc)
    opened = open_bundle(bundle, verify="all")
    need_mb = _check_memory(opened, chosen, memory_mb)
    with tempfile.TemporaryDirectory(prefix="edge-pack-") as tmp:
        unit = Path(tmp) / "edge-llm.service"
        unit.write_text(service.render(Path(PREFIX), chosen, service.memory_max_mb(chosen, need_mb)))
        members = [archive.Member("profile.toml", Path(chosen.source)), archive.Member("edge-llm.service", unit)]
        members += [archive.Member(f"bundle/{p.relative_to(bundle).as_posix()}", p)
                    for p in sorted(Path(bundle).rglob("*")) if p.is_file()]
        info = {"profile": chosen.name, "bundle": Path(bundle).name, "bundle_only": bundle_only,
                "target": {"machine": target.machine, "python": target.python, "glibc": target.glibc}}
        if not bundle_only:
            members += _runtime_members(target, wheels, runtime_wheel, Path(tmp))
            info["runtime_wheel"] = next(m.source.name for m in members if m.name.startswith("wheels/edge_llm-"))
            if _wants_gpu(chosen):
                members, info["onnxruntime"] = _gpu_onnxruntime(members, onnxruntime_wheel, target)
        elif onnxruntime_wheel:
            raise PackError("--onnxruntime-wheel goes with a full pack: a bundle-only pack reuses the environment")
        return archive.write(out, members, info, sign_key)


def _wants_gpu(profile: Profile) -> bool:
    return any(p.name != "CPUExecutionProvider" for p in profile.providers)


def _gpu_onnxruntime(members: list[archive.Member], wheel: Path | None, target: wheelhouse.Target):
    """The PyPI onnxruntime (CPU only) swapped for the user's GPU wheel, or dropped for the board's own."""
    kept = [m for m in members if not m.name.startswith("wheels/onnxruntime")]
    if wheel is None:
        return kept, "system"
    if not wheel.is_file() or not wheel.name.startswith(("onnxruntime_gpu-", "onnxruntime-")):
        raise PackError(f"--onnxruntime-wheel {wheel}: not an onnxruntime wheel file")
    tags = wheel.stem.split("-")[-3:]
    if target.machine not in tags[2] or not any(t in (f"cp{target.python.replace('.', '')}", "abi3")
                                                for t in tags[:2]):
        raise PackError(f"--onnxruntime-wheel {wheel.name} is not for {target.machine} with Python {target.python}")
    return kept + [archive.Member(f"wheels/{wheel.name}", wheel)], wheel.name


def _runtime_members(target: wheelhouse.Target, wheels: Path | None, runtime_wheel: Path | None,
                     tmp: Path) -> list[archive.Member]:
    """The install script, edge-llm's wheel and its dependencies' wheels for the target."""
    house = _wheels(target, wheels, tmp / "wheels")
    own = runtime_wheel or build_runtime_wheel(tmp / "runtime")
    script = tmp / "install.sh"
    script.write_text(INSTALL_SH)
    script.chmod(0o755)
    return [archive.Member("install.sh", script), archive.Member(f"wheels/{own.name}", own),
            *(archive.Member(f"wheels/{w.name}", w) for w in house)]


def _target(profile: Profile, python: str | None, glibc: str | None) -> wheelhouse.Target:
    machine = profile.match.arch
    if machine not in MACHINES:
        raise PackError(f"profile {profile.name} is for no particular machine; pack for a board's profile "
                        f"(edge devices lists them)")
    version = python or profile.system.python
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if len(numbers) != 2:
        raise PackError(f"--python {version!r}: give major.minor, e.g. 3.11")
    if numbers < OLDEST_PYTHON:
        stack = TOO_OLD.get(version, f"Python {version}")
        raise PackError(f"{profile.name}: {stack} has Python {version}, older than the 3.10 onnxruntime needs: "
                        f"move the board to a newer OS (JetPack 6 on a Jetson Orin; on a Jetson Nano, Python 3.10+ "
                        f"from Miniforge and --python 3.10), or pass --python for the one it has")
    return wheelhouse.Target(machine, version, glibc or profile.system.glibc)


def _check_memory(opened, profile: Profile, memory_mb: int | None) -> float:
    """The bundle's memory estimate at the profile's default context (MB), refused where it cannot fit."""
    from edge import memory

    context = memory.planned_context(opened.manifest, profile, None)
    need = memory.estimate(opened, context).total_mb
    have = memory_mb or profile.memory.budget_mb
    if have and need > have - profile.memory.reserve_mb:  # else unknown until it runs: the loader checks it there
        raise PackError(f"the bundle needs about {need:.0f} MB at {profile.name}'s default context of {context} "
                        f"tokens, more than {have} MB less the {profile.memory.reserve_mb} MB reserve: pick a "
                        f"smaller quantization or model, or a profile with a shorter default_context")
    return need


def _wheels(target: wheelhouse.Target, given: Path | None, dest: Path) -> list[Path]:
    if given is None:
        try:
            return wheelhouse.download(target, dest)
        except (RuntimeError, ValueError) as e:
            raise PackError(str(e)) from None
    if not given.is_dir():
        raise PackError(f"--wheels {given}: no such folder")
    try:
        return [w for w in wheelhouse.check(given, target) if not w.name.startswith("edge_llm-")]
    except RuntimeError as e:
        raise PackError(f"--wheels {given}: {e}") from None


def build_runtime_wheel(dest: Path) -> Path:
    """edge-llm's wheel, built from the checkout this module runs from (a copy: a build writes beside the
    sources)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "devices").is_dir():
        raise PackError("this edge-llm is installed, not a checkout: pass --runtime-wheel FILE (its wheel)")
    src = dest / "src"
    for name in ("edge", "export", "devices"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                           "-w", str(dest)], capture_output=True, text=True)
    if done.returncode != 0:
        raise PackError(f"building edge-llm's wheel failed: {done.stderr.strip()[-600:]}")
    return next(dest.glob("edge_llm-*.whl"))

