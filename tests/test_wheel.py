"""The runtime wheel holds the runtime only, under one top-level name, and imports without the workstation's
packages (the same import check runs under emulated ARM64 in tests/test_arm64.py, where they are not installed)."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

BLOCKED = ("torch", "transformers", "onnx", "optimum", "onnxruntime_genai", "llama_cpp")


def test_the_wheel_installs_edge_and_nothing_else(runtime_wheel):
    names = zipfile.ZipFile(runtime_wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"edge", runtime_wheel.name.split("-py3")[0] + ".dist-info"}
    assert "edge/devices/raspberry-pi-5.toml" in names and "edge/export/eval_text.txt" in names
    assert any(n.startswith("edge/demo/stories260K/") for n in names)
    # the peers and their child programs live in benchmarks/, run from a checkout
    assert not [n for n in names if "peers" in n or "llamacpp" in n or n.startswith(("edge/benchmarks", "edge/tests"))]


def test_every_runtime_module_imports_without_the_workstation_packages(runtime_wheel, tmp_path):
    """The wheel unpacked alone on the path, with torch, transformers, onnx, optimum and the peers made unimportable;
    only the exporter (edge.export, behind `edge export`'s lazy import) may need them."""
    zipfile.ZipFile(runtime_wheel).extractall(tmp_path / "site")
    script = (f"import sys\nfor name in {BLOCKED!r}: sys.modules[name] = None\n"
              "import importlib, pkgutil, edge\n"
              f"assert edge.__file__.startswith({str(tmp_path / 'site')!r}), edge.__file__\n"
              "names = [m.name for m in pkgutil.walk_packages(edge.__path__, 'edge.') "
              "if not m.name.startswith('edge.export')]\n"
              "for name in names: importlib.import_module(name)\n"
              "print(len(names))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 20  # every module of edge/ and edge/devices/


def test_nothing_in_the_runtime_imports_the_exporter():
    """Only `edge export`'s lazy import in the CLI names edge.export; nothing imports benchmarks/."""
    root = Path(__file__).resolve().parents[1]
    imports = [(str(path.relative_to(root)), line.strip())
               for path in sorted([*(root / "edge").glob("*.py"), *(root / "devices").glob("*.py")])
               for line in path.read_text().splitlines()
               if re.match(r"\s*(from|import)\s+(edge\.export|export|compare|llamacpp)\b", line)]
    assert imports == [("edge/cli.py", "from edge.export.pipeline import export")]
