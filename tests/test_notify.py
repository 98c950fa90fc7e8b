"""edge/notify.py and the server's use of it: READY=1 once the model has loaded, WATCHDOG=1 while the event loop
turns, STOPPING=1 on the way out; read from a fake systemd notify socket."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from edge.notify import notify, watchdog_interval


def test_no_manager_no_message():
    assert notify("READY=1", environ={}) is False
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0


def test_serve_reports_ready_pets_the_watchdog_and_says_stopping(tmp_path):
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "600000"}  # a ping every 0.3 s
        server = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "demo", "--port", "0"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            messages, started = [], time.monotonic()
            while sum(m == "WATCHDOG=1" for m in messages) < 3 or not any(m.startswith("READY=1") for m in messages):
                messages.append(manager.recv(4096).decode())
            assert time.monotonic() - started < 60
            server.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in messages:
                messages.append(manager.recv(4096).decode())
        finally:
            server.kill()
            server.wait()
    ready = next(m for m in messages if m.startswith("READY=1"))
    assert ready == "READY=1\nSTATUS=serving"
