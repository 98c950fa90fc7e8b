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
    """The unit of an installed prefix: it runs PREFIX/current, whichever version that is."""
    current = Path(prefix) / "current"
    return render_command(f"{current}/venv/bin/edge", f"{current}/pack/bundle", f"{current}/pack/profile.toml",
                          profile, memory_mb, host, port, condition=str(current))


def render_command(edge: str, bundle: str, profile_file: str, profile: Profile, memory_mb: int,
                   host: str = "127.0.0.1", port: int = 8080, condition: str = "") -> str:
    """A unit running `EDGE serve BUNDLE --profile PROFILE_FILE`; condition: a path that must exist to start
    (an image whose first boot failed has no current: nothing to run, and no restart loop)."""
    gpu = any(p.name != "CPUExecutionProvider" for p in profile.providers)
    lines = [
        "[Unit]",
        f"Description=edge-llm: an OpenAI-compatible LLM endpoint on {host}:{port} ({profile.name})",
        "After=network.target",
        *([f"ConditionPathExists={condition}"] if condition else []),
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"WatchdogSec={WATCHDOG_SEC}",
        "TimeoutStartSec=600",  # loading and optimizing a model on a cold SD card takes minutes
        "Restart=on-failure",
        "RestartSec=5",
        f"ExecStart={edge} serve {bundle} --profile {profile_file} --host {host} --port {port}",
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


# What the unit's sandbox hides from the service: ProtectHome and PrivateTmp
HIDDEN = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")
UNIT = "edge-llm.service"


def hidden(path: Path) -> str | None:
    """Why the service could not see path, or None."""
    resolved = Path(path).resolve()
    for folder in HIDDEN:
        if resolved == Path(folder) or Path(folder) in resolved.parents:
            return (f"{resolved} is under {folder}, which the unit's sandbox (ProtectHome, PrivateTmp) hides from "
                    f"the service: keep the bundle and the environment under /opt or /srv, or use edge pack and "
                    f"edge install")
    return None


def install(bundle: Path, profile_spec: str = "auto", host: str = "127.0.0.1", port: int = 8080,
            unit_dir: Path = Path("/etc/systemd/system"), start: bool = True) -> Path:
    """`edge service install`: a unit for this bundle run by this environment's edge-llm, enabled (and started)."""
    import sys

    from edge import memory
    from edge.bundle import open_bundle
    from edge.devices import resolve

    bundle = Path(bundle).resolve()
    for path in (bundle, Path(sys.prefix)):
        why = hidden(path)
        if why:
            raise ValueError(why)
    opened = open_bundle(bundle, verify="all")
    profile = resolve(profile_spec).profile
    need = memory.estimate(opened, memory.planned_context(opened.manifest, profile, None)).total_mb
    text = render_command(f"{sys.executable} -m edge.cli", str(bundle), profile.source, profile,
                          memory_max_mb(profile, need), host, port)
    unit = Path(unit_dir) / UNIT
    unit.write_text(text)
    systemctl("daemon-reload")
    systemctl("enable", *(["--now"] if start else []), UNIT)
    return unit


def uninstall(unit_dir: Path = Path("/etc/systemd/system")) -> None:
    systemctl("disable", "--now", UNIT, check=False)  # not loaded is fine: it is going anyway
    (Path(unit_dir) / UNIT).unlink(missing_ok=True)
    systemctl("daemon-reload")


def status(port: int = 8080) -> tuple[str, str]:
    """(systemd's view: active, failed, ...; /health's)."""
    import json
    import urllib.request

    state = systemctl("is-active", UNIT, check=False).stdout.strip() or "unknown"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            health = json.loads(response.read()).get("status", "?")
    except (OSError, ValueError) as e:
        health = f"no answer ({e})"
    return state, health


def systemctl(*args: str, check: bool = True):
    import subprocess

    done = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ValueError(f"systemctl {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return done
