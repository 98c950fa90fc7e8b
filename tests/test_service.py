"""edge/service.py: the systemd unit an installed version runs as (checked by systemd-analyze in
tests/test_install.py, where a real prefix exists)."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge.devices import load_profile
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
