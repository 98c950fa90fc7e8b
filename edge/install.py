"""`edge install PACK`: put a pack (edge/archive.py) under a prefix as a new version, prove it works, then switch
to it, with no network and without ever leaving the board without a working version.

    PREFIX/versions/<id>/   pack/ (the checked members), venv/ (from pack/wheels, --no-index), COMPLETE
    PREFIX/current          a symbolic link to the version in use, replaced atomically

The order is what makes an install safe to kill at any point (power loss, kill -9): a version is written in full,
then proves itself (its environment imports edge-llm, the bundle verifies and loads, one token generates), then
gets its COMPLETE marker, fsynced; only then is a new link made beside `current` and renamed over it, and the
prefix folder fsynced. Until that rename, `current` is the previous version, whole; a version folder without
COMPLETE is a leftover that the next install removes. The previous version stays until the next good install.

Standard library only: the packed install script runs this with the board's python3 before any venv exists.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edge import archive

COMPLETE = "COMPLETE"
SELF_CHECK = """
import sys, edge, onnxruntime
if sys.argv[3] == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
    sys.exit("onnxruntime here offers " + ", ".join(onnxruntime.get_available_providers()) + ", not the CUDA "
             "provider the profile wants: install NVIDIA's onnxruntime-gpu for this JetPack (edge pack "
             "--onnxruntime-wheel FILE packs one)")
engine = edge.load(sys.argv[1], profile=sys.argv[2], verify="all")  # the profile the service will run under
tokens = [r.token for r in engine.stream("Hello", max_tokens=1, temperature=0)]
assert len(tokens) == 1, tokens
print("self-check: loaded", sys.argv[1], "and generated a token")
"""


class InstallError(RuntimeError):
    """An install that did not switch: `current` is as it was."""


def install(pack: Path, prefix: Path, trusted: list[Path] | None = None, python: str = sys.executable,
            log=print, service=None) -> Path:
    """Install pack under prefix and switch `current` to it; returns the new version's folder.

    service: what runs `current` (a Systemd, or a stand-in with the same two methods): after the switch it is
    restarted and must answer /health, else `current` goes back to the previous version, which is restarted."""
    archive.verify(pack, trusted)  # a refused pack leaves the prefix as it was, not even created
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # one install at a time: each removes leftovers
        except BlockingIOError:
            raise InstallError(f"another edge install is running on {prefix}") from None
        return _install(pack, prefix, trusted, python, log, service)


def _install(pack: Path, prefix: Path, trusted, python: str, log, service) -> Path:
    versions = prefix / "versions"
    versions.mkdir(exist_ok=True)
    _remove_leftovers(versions, keep=_current(prefix))
    version = _unique(versions / time.strftime("%Y%m%d-%H%M%S"))
    manifest = _unpack(pack, version, trusted, log)
    previous = _current(prefix)
    if manifest.get("bundle_only"):
        _reuse_venv(version, previous, prefix)
    _finish(version, prefix, python, log, onnxruntime=manifest.get("onnxruntime"))
    switch(prefix, version)
    log(f"edge install: {prefix / 'current'} -> {version.name}" + (f" (previous: {previous.name})" if previous else ""))
    if service is not None:
        _restart_or_roll_back(service, prefix, version, previous, log)
    _prune(versions, keep={version, previous})
    return version


def _unpack(pack: Path, version: Path, trusted: list[Path] | None, log) -> dict:
    try:
        manifest = archive.read(pack, version / "pack", trusted)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    (version / "pack.json").write_text(json.dumps(manifest))  # what the first boot needs to know of it
    log(f"edge install: {pack} checked ({len(manifest['members'])} members) into {version}")
    return manifest


def _reuse_venv(version: Path, previous: Path | None, prefix: Path) -> None:
    """A bundle-only pack runs in the environment of the version in use (linked, and kept while linked)."""
    if previous is None:
        shutil.rmtree(version, ignore_errors=True)
        raise InstallError(f"{prefix} has no version installed for this bundle-only pack to reuse: install a full "
                           f"pack (edge pack without --bundle-only) first")
    owner = venv_owner(previous)
    (version / "venv").symlink_to(Path("..") / owner.name / "venv")


def venv_owner(version: Path) -> Path:
    """The version whose venv folder this version runs in (itself, unless a bundle-only install linked it)."""
    venv = version / "venv"
    return version.parent / Path(os.readlink(venv)).parent.name if venv.is_symlink() else version


def _finish(version: Path, prefix: Path, python: str, log, keep=None, onnxruntime: str | None = None) -> None:
    """venv, self-check, unit, COMPLETE: a version that may become current. If a step fails the version is
    removed (keep: what to do instead, e.g. at first boot, where the pack is the image's only copy).
    onnxruntime: None (the packed PyPI wheel), "system" (the board's own, e.g. JetPack's onnxruntime-gpu) or the
    packed GPU wheel's name; the latter two must offer the CUDA provider."""
    keep = keep or (lambda v: shutil.rmtree(v, ignore_errors=True))
    try:
        venv = version / "venv" if (version / "venv").is_symlink() else make_venv(version, python, log, onnxruntime)
        self_check(venv, version / "pack" / "bundle", log, cuda=onnxruntime is not None)
        _write_unit(version, str(prefix.resolve()))
        _mark_complete(version)
    except (subprocess.CalledProcessError, OSError) as e:
        keep(version)
        raise InstallError(f"{e}{_stderr_of(e)}; {prefix / 'current'} is unchanged") from None
    except BaseException:
        keep(version)
        raise


def _stderr_of(e: Exception) -> str:
    """What a failed child said (e.g. ensurepip missing), to go with its exit status."""
    out = getattr(e, "stderr", None) or b""
    text = (out.decode(errors="replace") if isinstance(out, bytes) else out).strip()
    return f": {text[-600:]}" if text else ""


def _restart_or_roll_back(service, prefix: Path, version: Path, previous: Path | None, log) -> None:
    try:
        service.install(prefix)
    except (OSError, subprocess.CalledProcessError) as e:
        raise InstallError(f"{version.name} is installed and current, but its unit could not be enabled ({e}); "
                           f"without systemd, pass --no-service") from None
    problem = service.restart_and_check()
    if problem is None:
        log(f"edge install: the service runs {version.name} and answers /health")
        return
    if previous is None:
        raise InstallError(f"the service did not come up on {version.name}: {problem}")
    switch(prefix, previous)
    service.install(prefix)  # daemon-reload: the previous version's unit may differ
    again = service.restart_and_check()
    shutil.rmtree(version, ignore_errors=True)
    raise InstallError(f"the service did not come up on {version.name} ({problem}), so {prefix / 'current'} is "
                       f"back on {previous.name}" + ("" if again is None else f", which did not come up either "
                                                                              f"({again})"))


class Systemd:
    """The edge-llm unit under systemd: linked from the current version, enabled, restarted, then /health."""

    def __init__(self, port: int = 8080, unit_dir: Path = Path("/etc/systemd/system"), timeout: float = 600):
        self.port, self.unit_dir, self.timeout = port, unit_dir, timeout

    def install(self, prefix: Path) -> None:
        """The unit linked to the current version's copy (replacing a file an image build left), reloaded and
        enabled."""
        link, target = self.unit_dir / "edge-llm.service", prefix.resolve() / "current" / "edge-llm.service"
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        for command in (["daemon-reload"], ["enable", "edge-llm.service"]):
            subprocess.run(["systemctl", *command], check=True, capture_output=True)

    def restart_and_check(self) -> str | None:
        """None once /health says ok; else what went wrong."""
        done = subprocess.run(["systemctl", "restart", "edge-llm.service"], capture_output=True, text=True)
        if done.returncode != 0:
            return f"systemctl restart failed: {done.stderr.strip()[-300:]}"
        return wait_for_health(self.port, self.timeout)


def wait_for_health(port: int, timeout: float) -> str | None:
    import json
    import urllib.request

    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if json.loads(response.read()).get("status") == "ok":
                    return None
        except (OSError, ValueError) as e:  # refused while starting; 503 while loading; not our server
            last = str(e)
        time.sleep(1)
    return f"/health on port {port} did not say ok within {timeout:.0f} s ({last})"


PENDING = "PENDING-FIRST-BOOT"
FIRST_BOOT_UNIT = """[Unit]
Description=edge-llm: build the environment of the version an image was made with, once, at first boot
ConditionPathExists=!{prefix}/current
Before=edge-llm.service
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 {prefix}/first-boot.py
TimeoutStartSec=1800

[Install]
WantedBy=multi-user.target
"""
FIRST_BOOT_SCRIPT = """# edge-llm's first boot: the packed installer (a pure-Python wheel) builds the pending version's
# venv from its packed wheels, runs the self-check and makes it current. Written by `edge install --root`.
import glob, sys
sys.path.insert(0, sorted(glob.glob({wheels!r}))[-1])
from edge.install import main
sys.exit(main(["--first-boot", {prefix!r}]))
"""


def install_into_image(pack: Path, root: Path, prefix: Path, trusted: list[Path] | None = None, log=print) -> Path:
    """--root: lay the pack down in an image's tree for prefix (a path on the board), with the service and a
    first-boot unit enabled but not started. The board's own python3 builds the venv at first boot (an x86 image
    builder needs no emulation for that), then the self-check runs there."""
    if not prefix.is_absolute():
        raise InstallError(f"--prefix {prefix}: with --root, give the board's absolute path (e.g. /opt/edge-llm)")
    archive.verify(pack, trusted)
    if not root.is_dir():
        raise InstallError(f"--root {root}: no such folder (mount the image first)")
    on_disk = root / prefix.relative_to("/")
    versions = on_disk / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    version = _unique(versions / time.strftime("%Y%m%d-%H%M%S"))
    if _unpack(pack, version, trusted, log).get("bundle_only"):
        shutil.rmtree(version, ignore_errors=True)
        raise InstallError("a bundle-only pack needs an installed version to reuse; an image needs a full pack")
    (version / PENDING).write_text("built at first boot by edge-llm-firstboot.service\n")
    wheels = str(prefix / "versions" / version.name / "pack" / "wheels" / "edge_llm-*.whl")
    (on_disk / "first-boot.py").write_text(FIRST_BOOT_SCRIPT.format(wheels=wheels, prefix=str(prefix)))
    units = root / "etc" / "systemd" / "system"
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    # real files, not links into current: at first boot there is no current yet when systemd reads its units
    (units / "edge-llm-firstboot.service").write_text(FIRST_BOOT_UNIT.format(prefix=prefix))
    _write_unit(version, str(prefix), units / "edge-llm.service")
    for name in ("edge-llm.service", "edge-llm-firstboot.service"):  # enabled, as `systemctl enable` would
        if (wants / name).is_symlink() or (wants / name).exists():
            (wants / name).unlink()
        (wants / name).symlink_to(Path("/etc/systemd/system") / name)
    log(f"edge install: {version.name} laid down in {on_disk} for {prefix}; edge-llm-firstboot.service builds it "
        f"at first boot")
    return version


def first_boot(prefix: Path, python: str = sys.executable, log=print) -> Path:
    """On the board: finish the version --root left pending and make it current."""
    pending = sorted(p.parent for p in (prefix / "versions").glob(f"*/{PENDING}"))
    if not pending:
        raise InstallError(f"no version under {prefix / 'versions'} is waiting for its first boot")
    version = pending[-1]
    # a failure keeps the pack (the image's only copy) and drops the half-made venv: the next boot tries again
    onnxruntime = json.loads((version / "pack.json").read_text()).get("onnxruntime")
    _finish(version, prefix, python, log, keep=lambda v: shutil.rmtree(v / "venv", ignore_errors=True),
            onnxruntime=onnxruntime)
    switch(prefix, version)
    (version / PENDING).unlink()
    log(f"edge install: first boot: {prefix / 'current'} -> {version.name}")
    return version


def _unique(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def run_target(command: list[str], **options) -> subprocess.CompletedProcess:
    """Run one of the board's programs (its python3, the new venv's). EDGE_INSTALL_LAUNCHER (e.g.
    "qemu-aarch64-static -L SYSROOT") goes in front of each, so that the installer can run under a user-mode
    emulator, which cannot start another program of the emulated machine by itself (CI's ARM64 tests do this)."""
    return subprocess.run([*shlex.split(os.environ.get("EDGE_INSTALL_LAUNCHER", "")), *command], **options)


def make_venv(version: Path, python: str, log, onnxruntime: str | None = None) -> Path:
    """A venv from the pack's wheels only (--no-index). pip itself comes from the pack's pip wheel where there is
    one, so that no ensurepip (python3-venv on Debian) is needed either. With a GPU onnxruntime (the board's, or a
    packed onnxruntime-gpu, which pip would not take for edge-llm's `onnxruntime` requirement) every packed wheel
    is installed as packed (--no-deps)."""
    venv, wheels = version / "venv", version / "pack" / "wheels"
    pip_wheel = next(iter(sorted(wheels.glob("pip-*.whl"))), None)
    command = [python, "-m", "venv", str(venv)] + (["--without-pip"] if pip_wheel else [])
    command += ["--system-site-packages"] if onnxruntime == "system" else []
    run_target(command, check=True, capture_output=True)
    runtime = next(wheels.glob("edge_llm-*.whl"))
    pip = [str(venv / "bin" / "python"), *([str(pip_wheel / "pip")] if pip_wheel else ["-m", "pip"])]
    targets = [str(w) for w in sorted(wheels.glob("*.whl")) if not w.name.startswith("pip-")] if onnxruntime \
        else [str(runtime)]
    log(f"edge install: installing {runtime.name} and {len(list(wheels.glob('*.whl'))) - 1} wheels, no network")
    done = run_target([*pip, "install", "--no-index", "--find-links", str(wheels), "--disable-pip-version-check",
                           "-q", *(["--no-deps"] if onnxruntime else []), *targets], capture_output=True, text=True)
    if done.returncode != 0:
        raise InstallError(f"pip could not install the pack's wheels (current is unchanged): "
                           f"{done.stderr.strip()[-800:]}")
    return venv


def self_check(venv: Path, bundle: Path, log, cuda: bool = False) -> None:
    """cuda: the version must offer onnxruntime's CUDA provider (a Jetson's onnxruntime-gpu)."""
    done = run_target([str(venv / "bin" / "python"), "-c", SELF_CHECK, str(bundle),
                           str(bundle.parent / "profile.toml"), "cuda" if cuda else ""], capture_output=True,
                          text=True, cwd=venv)  # not the caller's folder, where an edge/ checkout could shadow it
    if done.returncode != 0:
        raise InstallError(f"the new version's self-check failed, so current is unchanged: "
                           f"{done.stderr.strip()[-800:]}")
    log(f"edge install: {done.stdout.strip()}")


def _write_unit(version: Path, prefix: str, out: Path | None = None) -> None:
    """The packed systemd unit with prefix (the path on the board) in it, beside the version
    (PREFIX/current/edge-llm.service) or at out."""
    packed = version / "pack" / "edge-llm.service"
    if packed.exists():
        (out or version / "edge-llm.service").write_text(packed.read_text().replace("@PREFIX@", prefix))


def _mark_complete(version: Path) -> None:
    # Everything written so far (pack, venv) on disk before the marker that vouches for it: with delayed
    # allocation a power cut could otherwise leave a COMPLETE version of empty files.
    os.sync()
    marker = version / COMPLETE
    with open(marker, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(version)
    _fsync_dir(version.parent)


def switch(prefix: Path, version: Path) -> None:
    """Point prefix/current at version atomically: a new link beside it, renamed over it, the folder fsynced."""
    link = prefix / ".current.new"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("versions") / version.name)
    os.replace(link, prefix / "current")
    _fsync_dir(prefix)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current(prefix: Path) -> Path | None:
    link = prefix / "current"
    return (prefix / os.readlink(link)) if link.is_symlink() else None


def _remove_leftovers(versions: Path, keep: Path | None) -> None:
    """Versions an interrupted install left without COMPLETE (never the one in use, nor one waiting for its first
    boot)."""
    for folder in versions.iterdir():
        if folder.is_dir() and not (folder / COMPLETE).exists() and not (folder / PENDING).exists() \
                and (keep is None or folder.name != keep.name):
            shutil.rmtree(folder, ignore_errors=True)


def _prune(versions: Path, keep: set) -> None:
    kept = [v for v in keep if v is not None]
    names = {v.name for v in kept} | {venv_owner(v).name for v in kept if v.exists()}
    for folder in versions.iterdir():
        if folder.is_dir() and folder.name not in names:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--first-boot":  # edge-llm-firstboot.service, with the board's python3
        try:
            first_boot(Path(argv[1]))
        except InstallError as e:
            print(f"edge install: error: {e}", file=sys.stderr)
            return 1
        return 0
    parser = argparse.ArgumentParser(prog="edge install", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pack", type=Path, help="the archive `edge pack` wrote")
    parser.add_argument("--prefix", type=Path, default=Path("/opt/edge-llm"), help="where versions live (%(default)s)")
    parser.add_argument("--trust", type=Path, action="append", default=[], metavar="PUBKEY",
                        help="refuse packs not signed by this ed25519 public key (PEM); repeat for several")
    parser.add_argument("--python", default=sys.executable, help="the python3 the version's venv is made from")
    parser.add_argument("--no-service", action="store_true",
                        help="only install and switch; do not enable, restart and check the systemd unit")
    parser.add_argument("--port", type=int, default=8080, help="the port the unit serves on, for the /health check")
    parser.add_argument("--root", type=Path, help="an image's root folder (mounted SD card, pi-gen/Yocto tree): lay "
                                                  "the pack down for --prefix there, the venv is built at first boot")


def run(args) -> int:
    try:
        if args.root is not None:
            install_into_image(args.pack, args.root, args.prefix, args.trust)
            return 0
        service = None if args.no_service else Systemd(args.port)
        version = install(args.pack, args.prefix, args.trust, args.python, service=service)
    except (archive.ArchiveError, InstallError, OSError) as e:  # OSError: e.g. no permission on the prefix
        print(f"edge install: error: {e}", file=sys.stderr)
        return 1
    print(f"edge install: ready: {version / 'venv' / 'bin' / 'edge'} serve {version / 'pack' / 'bundle'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
