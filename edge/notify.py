"""systemd's notification protocol (sd_notify(3)) for `Type=notify` units, without libsystemd: READY=1 once the
model has loaded, WATCHDOG=1 from the event loop while it still turns (a hung server stops petting and systemd
restarts it), STOPPING=1 on shutdown. Every call is a no-op outside systemd (no NOTIFY_SOCKET)."""
from __future__ import annotations

import os
import socket


def notify(message: str, environ=os.environ) -> bool:
    """Send one notification; False where no service manager listens."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError:
        return False  # the manager went away: serving matters more than telling it
    return True


def watchdog_interval(environ=os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec, as sd_watchdog_enabled(3) advises); None when the
    unit has no watchdog or it is meant for another process."""
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
