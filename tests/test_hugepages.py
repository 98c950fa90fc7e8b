"""The CLI re-executes itself once with glibc asking for transparent huge pages, and leaves the user's tunables."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edge import hugepages

PROBE = "import os; from edge import hugepages; hugepages.reexec(True); print(os.environ.get('GLIBC_TUNABLES'))"


def run_probe(**env) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "EDGE_HUGEPAGES")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**environ, **env},
                          check=True, timeout=60)
    return done.stdout.strip()


@pytest.mark.skipif(not hugepages.applies(True, {}), reason="no glibc >= 2.35 or transparent huge pages off here")
def test_the_process_reexecutes_itself_once_with_the_tunable():
    assert run_probe() == hugepages.TUNABLE
    assert run_probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}"
    assert run_probe(EDGE_HUGEPAGES="0") == "None"  # the override beats the profile


def test_an_existing_setting_is_kept():
    mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert hugepages.environment(mine) == mine  # the user's choice, even "off", wins


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                                        ("always madvise [never]", "never")])
def test_kernel_mode(tmp_path, text, mode):
    (tmp_path / "enabled").write_text(text)
    assert hugepages.kernel_mode(tmp_path / "enabled") == mode
    assert hugepages.kernel_mode(tmp_path / "missing") == "unavailable"


@pytest.mark.parametrize("user", [{}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}])
def test_peers_get_the_environment_back_as_the_user_had_it(user):
    ours = hugepages.environment({"PATH": "/bin", **user})
    assert hugepages.active(ours)
    assert hugepages.original_environment(ours) == {"PATH": "/bin", **user}
    set_by_user = {"GLIBC_TUNABLES": hugepages.TUNABLE}
    assert hugepages.original_environment(hugepages.environment(set_by_user)) == set_by_user
