"""The systemd unit that runs an installed version (PREFIX/current) as a hardened, watched service.

`Type=notify` with a watchdog: the server says READY=1 once the model has loaded and pets the watchdog from its
event loop (edge/notify.py), so a hung server is restarted, not left answering nothing for months. The rest is the
usual hardening for a network service that reads a model and writes only its cache: its own (dynamic) user, no
privileges,
a read-only system, no home folders, private /tmp, and a memory limit from the profile.
"""
from __future__ import annotations

from pathlib import Path

from edge.devices import Profile

ENV_FILE = "/etc/edge-llm/edge-llm.env"  # EDGE_API_KEY=...; root-only (0600): systemd reads it before dropping to
# the service's user
WATCHDOG_SEC = 60  # a decode step of a 1B model on a Pi 4 takes well under a second; loading happens before READY


def memory_max_mb(profile: Profile, estimate_mb: float) -> int:
    """The unit's MemoryMax: the profile's budget where it has one, else the model's estimate at the default
    context plus the profile's reserve (the kernel then kills a runaway server, not the board's other work)."""
    return profile.memory.budget_mb or int(estimate_mb + profile.memory.reserve_mb)


def render(prefix: Path, profile: Profile, memory_mb: int, host: str = "127.0.0.1", port: int = 8080) -> str:
    current = Path(prefix) / "current"
    gpu = any(p.name != "CPUExecutionProvider" for p in profile.providers)
    lines = [
        "[Unit]",
        f"Description=edge-llm: an OpenAI-compatible LLM endpoint on {host}:{port} ({profile.name})",
        "After=network.target",
        f"ConditionPathExists={current}",  # an image whose first boot failed: nothing to run, no restart loop
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"WatchdogSec={WATCHDOG_SEC}",
        "TimeoutStartSec=600",  # loading and optimizing a model on a cold SD card takes minutes
        "Restart=on-failure",
        "RestartSec=5",
        f"ExecStart={current}/venv/bin/edge serve {current}/pack/bundle --profile {current}/pack/profile.toml "
        f"--host {host} --port {port}",
        # its own user, made by systemd for the service and gone with it: nothing to create on the board or the image
        "DynamicUser=yes",
        f"EnvironmentFile=-{ENV_FILE}",
        # ProtectHome hides ~/.cache: the optimized-model cache lives in /var/cache/edge-llm instead, kept across
        # boots (else it is rebuilt at every start)
        "CacheDirectory=edge-llm",
        "Environment=XDG_CACHE_HOME=/var/cache",
        f"MemoryMax={memory_mb}M",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        # the CUDA provider needs /dev/nvidia* (Jetson: /dev/nvhost-*, /dev/nvmap); CPU-only boards need no devices
        *([] if gpu else ["PrivateDevices=yes"]),
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures=native",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)
