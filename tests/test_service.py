"""edge/service.py: the systemd unit an installed version runs as (checked by systemd-analyze in
tests/test_install.py, where a real prefix exists)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from edge.devices import load_profile
from edge.engine import DEMO
from edge.service import memory_max_mb, render

HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
             "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "DynamicUser=yes",
             "ConditionPathExists=/opt/edge-llm/current")


@pytest.mark.parametrize("profile, private_devices", [("raspberry-pi-5", True), ("jetson-orin-nano", False)])
def test_the_unit_is_watched_hardened_and_bounded(profile, private_devices):
    chosen = load_profile(profile)
    unit = render(Path("/opt/edge-llm"), chosen, memory_max_mb(chosen, 300.0)).splitlines()
    assert {"Type=notify", "WatchdogSec=60", "Restart=on-failure", *HARDENING} <= set(unit)
    # the profile's budget where it sets one (Jetsons share memory with the GPU), else the estimate plus the reserve
    assert f"MemoryMax={chosen.memory.budget_mb or 300 + chosen.memory.reserve_mb}M" in unit
    assert ("PrivateDevices=yes" in unit) == private_devices  # the CUDA provider needs the GPU's devices
    assert "ExecStart=/opt/edge-llm/current/venv/bin/edge serve /opt/edge-llm/current/pack/bundle --profile " \
           "/opt/edge-llm/current/pack/profile.toml --host 127.0.0.1 --port 8080" in unit
    # ProtectHome hides ~/.cache: the cache must go where systemd lets the service write
    assert "CacheDirectory=edge-llm" in unit and "Environment=XDG_CACHE_HOME=/var/cache" in unit
    assert "EnvironmentFile=-/etc/edge-llm/edge-llm.env" in unit


@pytest.fixture
def fake_systemctl(tmp_path, monkeypatch):
    """A systemctl that logs its arguments (and says "active" when asked): the unit's own checks are
    systemd-analyze's, below."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "systemctl.log"
    (folder / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = is-active ] && echo active\nexit 0\n')
    (folder / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    return log


def test_service_install_writes_enables_and_starts_a_unit(fake_systemctl, tmp_path, monkeypatch):
    from edge import service

    units = tmp_path / "units"
    units.mkdir()
    with pytest.raises(ValueError, match="which the unit's sandbox .* hides from the service"):
        service.install(tmp_path / "bundle", unit_dir=units)  # tmp_path is under /tmp: PrivateTmp would hide it
    monkeypatch.setattr(service, "HIDDEN", ())  # this test's folders all live under /tmp
    unit = service.install(DEMO, "raspberry-pi-5", port=8123, unit_dir=units)
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m edge.cli serve {DEMO.resolve()} --profile " in text and "--port 8123" in text
    assert fake_systemctl.read_text().splitlines() == ["daemon-reload", "enable --now edge-llm.service"]
    if shutil.which("systemd-analyze"):
        done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert service.status(free_port())[0] == "active"
    service.uninstall(units)
    assert not unit.exists()
    assert fake_systemctl.read_text().splitlines()[-3:] == ["is-active edge-llm.service",
                                                            "disable --now edge-llm.service", "daemon-reload"]

