"""The memory estimate against measured RSS, and the load-time check that refuses what will not fit."""
from __future__ import annotations

import subprocess
import sys

import pytest

import edge
from edge.devices import Device, load_profile
from edge import memory
from edge.bundle import open_bundle
from edge.engine import DEMO, resolve

MEASURE = """
import sys, edge
def peak(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
engine = edge.load(sys.argv[1], context_length=int(sys.argv[2]), verify="none")
ids = [1] + [300] * (engine.context_length - 9)
for _ in engine.stream(ids, temperature=0, max_tokens=8):
    pass
print(peak())
"""


@pytest.mark.parametrize("name, quant, context", [("demo", None, 512), ("mid", "fp32", 1024), ("mid", "int4", 1024),
                                                  ("mid", "int8", 1024)])
def test_estimate_is_within_25_percent_of_measured_peak_rss(exports, name, quant, context):
    bundle = "demo" if name == "demo" else str(exports.bundle(name, quant))
    measured = float(subprocess.run([sys.executable, "-c", MEASURE, bundle, str(context)], capture_output=True,
                                    text=True, check=True).stdout)
    estimate = memory.estimate(open_bundle(resolve(bundle), verify="none"), context).total_mb
    print(f"\n{name} {quant or 'fp32'} at {context} tokens: estimate {estimate:.0f} MB, peak RSS {measured:.0f} MB "
          f"(x{estimate / measured:.2f})")
    assert 0.75 <= estimate / measured <= 1.25


def budget_profile(tmp_path, budget_mb: int):
    path = tmp_path / f"budget-{budget_mb}.toml"
    path.write_text(f'name = "budget-{budget_mb}"\n[[providers]]\nname = "CPUExecutionProvider"\n'
                    f'[memory]\nbudget_mb = {budget_mb}\ndefault_context = 512\n')
    return load_profile(path)


def test_over_budget_load_is_refused_with_the_numbers(tmp_path):
    with pytest.raises(memory.MemoryBudgetError) as error:
        edge.load("demo", profile=budget_profile(tmp_path, 40))
    message = str(error.value)
    assert "needs about 7" in message and "budget-40's budget allows 40 MB" in message
    assert "smaller context" in message and "quant" in message


def test_fitting_load_is_accepted(tmp_path):
    assert edge.load("demo", profile=budget_profile(tmp_path, 500)).generate("Once", max_tokens=3)


@pytest.mark.parametrize("device, limit", [
    (Device(mem_available_mb=300), r"free memory \(MemAvailable\)"),
    (Device(mem_available_mb=64000, cgroup_limit_mb=300), "cgroup limit"),
])
def test_what_the_machine_has_limits_too(device, limit):
    need = memory.estimate(open_bundle(DEMO), 512)
    profile = load_profile("cpu")  # reserve 256 MB: 300 MB leaves 44, under the demo's ~70
    with pytest.raises(memory.MemoryBudgetError, match=limit):
        memory.check(need, profile, device)
    memory.check(need, profile, Device(mem_available_mb=64000))


def test_cli_refuses_cleanly(tmp_path):
    from conftest import run_edge

    budget_profile(tmp_path, 40)
    result = run_edge("run", "demo", "Once", "--profile", str(tmp_path / "budget-40.toml"), check=False)
    assert result.returncode == 1 and "edge: error: the model needs about" in result.stderr
