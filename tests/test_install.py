"""`edge install`: a pack becomes a new version under a prefix with no network, proves itself, and only then
becomes `current`; a failed or killed install leaves the previous version in place and runnable."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import free_port, run_edge

from edge import install as installer
from edge.pack import pack


@pytest.fixture(scope="module")
def x86_pack(testbed, runtime_wheel, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "demo-x86.tar"
    pack("demo", "generic-x86-64", out, wheels=testbed["wheelhouse_x86_64"], runtime_wheel=runtime_wheel)
    return out


def offline_env() -> dict:
    """pip pointed at an address nothing listens on: any attempt to reach an index fails."""
    return {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1",
            "PIP_CONFIG_FILE": os.devnull}


def current(prefix: Path) -> Path:
    return prefix / "versions" / os.readlink(prefix / "current").split("/")[-1]


def runnable(version: Path) -> str:
    done = subprocess.run([str(version / "venv/bin/edge"), "run", str(version / "pack/bundle"), "Once upon a time",
                           "--max-tokens", "6"], capture_output=True, text=True, timeout=120, cwd=version)
    assert done.returncode == 0, done.stderr
    return done.stdout



def test_the_packed_script_installs_and_serves_from_an_empty_prefix(x86_pack, tmp_path):
    prefix = tmp_path / "opt" / "edge-llm"
    script = subprocess.run(["tar", "-xOf", str(x86_pack), "install.sh"], capture_output=True, check=True).stdout
    done = subprocess.run(["sh", "-s", "--", str(x86_pack), "--prefix", str(prefix), "--python", sys.executable,
                           "--no-service"],
                          input=script, capture_output=True, env=offline_env(), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    version = current(prefix)
    assert (version / installer.COMPLETE).exists() and "self-check: loaded" in done.stdout.decode()
    port = free_port()
    server = subprocess.Popen([str(version / "venv/bin/edge"), "serve", str(version / "pack/bundle"), "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        assert installer.wait_for_health(port, timeout=60) is None  # /health said {"status": "ok"}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian's systemd)")
def test_the_installed_unit_passes_systemd_analyze_verify(x86_pack, tmp_path):
    prefix = tmp_path / "edge"
    version = installer.install(x86_pack, prefix, log=lambda line: None)
    unit = version / "edge-llm.service"
    assert f"ExecStart={prefix.resolve()}/current/venv/bin/edge serve" in unit.read_text()
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    broken = tmp_path / "broken.service"  # the check can fail: a unit whose program is missing
    broken.write_text(unit.read_text().replace(str(prefix.resolve()), "/nonexistent"))
    assert subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True).returncode != 0


def test_upgrade_keeps_the_previous_version_and_prunes_older_ones(x86_pack, tmp_path):
    prefix = tmp_path / "edge"
    first = installer.install(x86_pack, prefix, log=lambda line: None)
    second = installer.install(x86_pack, prefix, log=lambda line: None)
    assert current(prefix) == second != first and first.exists()
    third = installer.install(x86_pack, prefix, log=lambda line: None)
    assert current(prefix) == third and second.exists() and not first.exists()  # the previous one only
    assert runnable(third).startswith(", there was")


def test_a_failed_self_check_leaves_current_as_it_was(x86_pack, tmp_path, monkeypatch):
    prefix = tmp_path / "edge"
    good = installer.install(x86_pack, prefix, log=lambda line: None)
    monkeypatch.setattr(installer, "SELF_CHECK", "raise SystemExit('the model does not load here')")
    with pytest.raises(installer.InstallError, match="self-check failed, so current is unchanged.*does not load"):
        installer.install(x86_pack, prefix, log=lambda line: None)
    assert current(prefix) == good and [p.name for p in (prefix / "versions").iterdir()] == [good.name]
    assert runnable(good).startswith(", there was")


def test_missing_wheels_fail_before_the_switch(x86_pack, tmp_path, monkeypatch):
    prefix = tmp_path / "edge"
    good = installer.install(x86_pack, prefix, log=lambda line: None)
    real = installer.make_venv

    def without_numpy(version, python, log, onnxruntime=None):
        for wheel in (version / "pack" / "wheels").glob("numpy-*.whl"):
            wheel.unlink()
        return real(version, python, log, onnxruntime)
    monkeypatch.setattr(installer, "make_venv", without_numpy)
    with pytest.raises(installer.InstallError, match="pip could not install the pack's wheels"):
        installer.install(x86_pack, prefix, log=lambda line: None)
    assert current(prefix) == good


@pytest.mark.parametrize("after", [0.3, 1.5, 3.0])
def test_an_install_killed_at_any_point_leaves_a_complete_current(x86_pack, tmp_path, after):
    """kill -9 part-way through an upgrade (unpacking, pip, the self-check, the switch): `current` is still a
    complete, runnable version, and the next install cleans up and succeeds."""
    prefix = tmp_path / "edge"
    installer.install(x86_pack, prefix, log=lambda line: None)
    child = subprocess.Popen([sys.executable, "-m", "edge.install", str(x86_pack), "--prefix", str(prefix),
                              "--no-service"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    time.sleep(after)
    child.send_signal(signal.SIGKILL)
    child.wait()
    version = current(prefix)  # the first version, or the new one if the kill came after the switch
    assert (version / installer.COMPLETE).exists() and runnable(version).startswith(", there was")
    again = installer.install(x86_pack, prefix, log=lambda line: None)
    assert current(prefix) == again
    assert all((v / installer.COMPLETE).exists() for v in (prefix / "versions").iterdir())


class FakeService:
    """What systemd does for the unit, in the test's hands: (re)start PREFIX/current's server, then check /health.
    `fail_next` starts the next version on a port the check does not look at, as a server that never comes up."""

    def __init__(self, port: int):
        self.port, self.process, self.started, self.fail_next = port, None, [], False

    def install(self, prefix: Path) -> None:
        self.prefix = prefix

    def restart_and_check(self) -> str | None:
        self.stop()
        version = current(self.prefix)
        port = free_port() if self.fail_next else self.port
        self.fail_next = False
        self.started.append(version.name)
        self.process = subprocess.Popen([str(version / "venv/bin/edge"), "serve", str(version / "pack/bundle"),
                                         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        cwd=version)
        return installer.wait_for_health(self.port, timeout=20)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def test_an_upgrade_whose_service_does_not_come_up_rolls_back(x86_pack, tmp_path):
    prefix, service = tmp_path / "edge", FakeService(free_port())
    try:
        good = installer.install(x86_pack, prefix, log=lambda line: None, service=service)
        assert service.started == [good.name]
        service.fail_next = True
        with pytest.raises(installer.InstallError, match=f"did not come up on .*so {prefix / 'current'} is back on "
                                                         f"{good.name}"):
            installer.install(x86_pack, prefix, log=lambda line: None, service=service)
        bad = service.started[1]
        assert service.started == [good.name, bad, good.name] and bad != good.name
        assert current(prefix) == good and not (prefix / "versions" / bad).exists()
        assert installer.wait_for_health(service.port, timeout=20) is None  # the previous version serves again
    finally:
        service.stop()


def test_root_lays_an_image_down_and_the_first_boot_finishes_it(x86_pack, tmp_path):
    """An image builder's tree: files and enabled units, nothing built (the builder may be another machine); the
    first-boot unit's script, run by hand as the board would, builds the venv, self-checks and makes it current."""
    root = tmp_path / "image"
    assert "no such folder (mount the image first)" in run_edge("install", str(x86_pack), "--root", str(root),
                                                                check=False).stderr
    root.mkdir()
    run_edge("install", str(x86_pack), "--root", str(root), "--prefix", "/opt/edge-llm")
    units, on_disk = root / "etc/systemd/system", root / "opt/edge-llm"
    assert "ExecStart=/opt/edge-llm/current/venv/bin/edge serve /opt/edge-llm/current/pack/bundle" in \
        (units / "edge-llm.service").read_text()
    for name in ("edge-llm.service", "edge-llm-firstboot.service"):
        assert os.readlink(units / "multi-user.target.wants" / name) == f"/etc/systemd/system/{name}"
    first_boot_unit = (units / "edge-llm-firstboot.service").read_text()
    assert "ConditionPathExists=!/opt/edge-llm/current" in first_boot_unit and "Before=edge-llm.service" in \
        first_boot_unit and "ExecStart=/usr/bin/python3 /opt/edge-llm/first-boot.py" in first_boot_unit
    assert not (on_disk / "current").exists() and not list(on_disk.glob("versions/*/venv"))
    script = (on_disk / "first-boot.py").read_text().replace("/opt/edge-llm", str(on_disk))  # the board's paths
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env=offline_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    version = current(on_disk)
    assert (version / installer.COMPLETE).exists() and not (version / installer.PENDING).exists()
    assert runnable(version).startswith(", there was")


def test_a_bundle_only_pack_reuses_the_installed_environment(x86_pack, tmp_path):
    bundle_only = tmp_path / "model-only.tar"
    pack("demo", "generic-x86-64", bundle_only, bundle_only=True)
    with tarfile.open(bundle_only) as tar:
        names = tar.getnames()
    assert "bundle/model.onnx" in names and not [n for n in names if n.startswith("wheels/") or n == "install.sh"]
    prefix = tmp_path / "edge"
    with pytest.raises(installer.InstallError, match="no version installed for this bundle-only pack"):
        installer.install(bundle_only, prefix, log=lambda line: None)
    full = installer.install(x86_pack, prefix, log=lambda line: None)
    model = installer.install(bundle_only, prefix, log=lambda line: None)
    assert current(prefix) == model and installer.venv_owner(model) == full
    assert runnable(model).startswith(", there was")
    again = installer.install(bundle_only, prefix, log=lambda line: None)  # keeps `full`: its venv is in use
    assert current(prefix) == again and full.exists() and runnable(again).startswith(", there was")
    assert sorted(p.name for p in (prefix / "versions").iterdir()) == sorted({full.name, model.name, again.name})


def test_a_gpu_pack_refuses_a_board_whose_onnxruntime_has_no_cuda(testbed, runtime_wheel, tmp_path):
    """A Jetson-like profile (CUDA provider) on this CPU-only machine: the self-check says what is missing and
    nothing switches."""
    profile = tmp_path / "gpu-box.toml"
    profile.write_text('name = "gpu-box"\n[match]\narch = "x86_64"\n[[providers]]\nname = "CUDAExecutionProvider"\n'
                       '[[providers]]\nname = "CPUExecutionProvider"\n')
    out = tmp_path / "gpu.tar"
    pack("demo", str(profile), out, wheels=testbed["wheelhouse_x86_64"], runtime_wheel=runtime_wheel)
    with pytest.raises(installer.InstallError, match="self-check failed, so current is unchanged"):
        installer.install(out, tmp_path / "edge", log=lambda line: None)
    assert not (tmp_path / "edge" / "current").exists() and not list((tmp_path / "edge" / "versions").iterdir())


@pytest.mark.parametrize("damage, message", [
    ("traversal", "member '../../evil' points outside"),
    ("checksum", "does not match its checksum"),
])
def test_a_refused_pack_leaves_the_prefix_untouched(x86_pack, tmp_path, damage, message):
    import io

    bad = tmp_path / "bad.tar"
    with tarfile.open(x86_pack) as src, tarfile.open(bad, "w") as out:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if damage == "checksum" and member.name == "bundle/model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 1])  # one bit, in the last member's data
            out.addfile(member, io.BytesIO(data))
        if damage == "traversal":
            evil = tarfile.TarInfo("../../evil")
            evil.size = 1
            out.addfile(evil, io.BytesIO(b"x"))
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    with pytest.raises(installer.archive.ArchiveError, match=message):
        installer.install(bad, fresh, log=lambda line: None)
    assert not fresh.exists()
    good = installer.install(x86_pack, used, log=lambda line: None)
    before = sorted(str(p.relative_to(used)) for p in used.rglob("*"))
    with pytest.raises(installer.archive.ArchiveError, match=message):
        installer.install(bad, used, log=lambda line: None)
    assert sorted(str(p.relative_to(used)) for p in used.rglob("*")) == before and current(used) == good
    assert not (tmp_path / "evil").exists()
