"""Transparent huge pages for the weights.

Decoding reads every weight once per token. With 4 KiB pages a 0.5B-parameter int4 model spans ~80,000 pages, and
the TLB misses of walking them cost about a tenth of a decode step. glibc's malloc asks the kernel for transparent
huge pages when GLIBC_TUNABLES holds glibc.malloc.hugetlb=1 (glibc 2.35 and later), which onnxruntime's weight
buffers then get; glibc reads tunables only at process start, so the CLI re-executes itself once with it set.
Measured on the Qwen2.5-0.5B shape, int4, 2 threads, x86-64: decode x1.10 over 8 paired runs, peak RSS +4 MB; but
loads take longer and vary more (SmolLM2 shape: 0.32-0.77 s against 0.37-0.53 s), as the kernel zeroes and
compacts memory for 2 MB pages. So the device profile decides (`[memory] huge_pages`); EDGE_HUGEPAGES=1 or 0
overrides it. Where transparent huge pages are off ("never"), glibc is older than 2.35, or the C library is not
glibc, nothing changes.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
ADDED = "EDGE_HUGEPAGES_ADDED"  # set by reexec(), so that benchmarks/compare.py's peers run as their users run them
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def kernel_mode(path: Path = THP_MODE) -> str:
    """The kernel's transparent huge page mode: "always", "madvise", "never", or "unavailable"."""
    try:
        text = path.read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def applies(profile_wants: bool, environ=os.environ) -> bool:
    """Whether to ask glibc for huge pages: the profile's choice unless EDGE_HUGEPAGES overrides it, and only
    where glibc and the kernel can act on it."""
    libc, version = platform.libc_ver()
    usable = libc == "glibc" and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) >= (2, 35)
    wanted = {"0": False, "1": True}.get(environ.get("EDGE_HUGEPAGES", ""), profile_wants)
    return wanted and usable and kernel_mode() in ("always", "madvise")


def active(environ=os.environ) -> bool:
    return "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "")


def environment(environ=os.environ) -> dict[str, str]:
    """A copy of environ with the tunable added to any the user set."""
    if active(environ):
        return dict(environ)
    current = environ.get("GLIBC_TUNABLES")
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE, ADDED: current or ""}


def original_environment(environ=os.environ) -> dict[str, str]:
    """environ as the user had it before reexec() added the tunable (unchanged if the user set it)."""
    if ADDED not in environ:
        return dict(environ)
    restored = {k: v for k, v in environ.items() if k not in ("GLIBC_TUNABLES", ADDED)}
    return {**restored, "GLIBC_TUNABLES": environ[ADDED]} if environ[ADDED] else restored


def describe(profile_wants: bool, environ=os.environ) -> str:
    setting = f"EDGE_HUGEPAGES={environ['EDGE_HUGEPAGES']}" if "EDGE_HUGEPAGES" in environ else \
        f"profile says {'yes' if profile_wants else 'no'}"
    libc = " ".join(platform.libc_ver()).strip() or "not glibc"
    where = f"kernel THP {kernel_mode()}, {libc}"
    return f"huge pages for weights: {'yes' if applies(profile_wants, environ) else 'no'} ({setting}; {where})"


def reexec(profile_wants: bool) -> None:
    """Replace this process with itself under the tunable, once; a no-op where it is not wanted, cannot help, or
    is already set."""
    if applies(profile_wants) and not active() and sys.executable:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, sys.orig_argv, environment())
        except OSError:  # an interpreter that cannot be started again: run on, with 4 KiB pages
            pass
