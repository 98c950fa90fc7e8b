"""`edge pack`: one offline archive for a board, with wheels for that board's machine and Python only."""
from __future__ import annotations

import json
import tarfile

import pytest
from conftest import run_edge

from edge.pack import PackError, pack


def members(path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_a_pi5_pack_holds_aarch64_wheels_for_its_python(testbed, runtime_wheel, tmp_path):
    out = tmp_path / "pi5.tar"
    result = run_edge("pack", "demo", "--target", "raspberry-pi-5", "-o", str(out), "--wheels",
                      str(testbed["wheelhouse"]), "--runtime-wheel", str(runtime_wheel))
    assert "for raspberry-pi-5 (aarch64, Python 3.11, glibc 2.36)" in result.stdout
    names = members(out)
    with tarfile.open(out) as tar:
        manifest = json.loads(tar.extractfile("edge-pack.json").read())
    assert list(names)[0] == "edge-pack.json" and set(manifest["members"]) == set(names) - {"edge-pack.json"}
    assert {"install.sh", "profile.toml", "bundle/manifest.json", "bundle/model.onnx"} <= set(names)
    wheels = [n.split("/")[1] for n in names if n.startswith("wheels/")]
    assert any(w.startswith("onnxruntime-") for w in wheels) and any(w.startswith("pip-") for w in wheels)
    for wheel in wheels:
        python, abi, platform = wheel[:-4].split("-")[-3:]
        assert platform == "any" or "aarch64" in platform, wheel
        tags = python.split(".")
        assert "py3" in tags or "cp311" in tags or (abi == "abi3" and any(int(t[3:]) <= 11 for t in tags)), wheel
    assert manifest["target"] == {"machine": "aarch64", "python": "3.11", "glibc": "2.36"}
    assert names["install.sh"].mode & 0o111


@pytest.mark.parametrize("target, python, message", [
    ("jetson-nano", None, "JetPack 4 \\(Jetson Nano\\) has Python 3.6, older than the 3.10"),
    ("jetson-orin-nano", "3.8", "JetPack 5 has Python 3.8"),
    ("cpu", None, "profile cpu is for no particular machine"),
])
def test_boards_onnxruntime_cannot_serve_are_refused_by_name(tmp_path, target, python, message):
    with pytest.raises(PackError, match=message):
        pack("demo", target, tmp_path / "x.tar", python=python)
    assert not (tmp_path / "x.tar").exists()


def test_a_bundle_that_will_not_fit_is_refused_with_the_numbers(testbed, runtime_wheel, tmp_path):
    result = run_edge("pack", "demo", "--target", "raspberry-pi-4", "-o", str(tmp_path / "x.tar"), "--memory-mb",
                      "400", "--wheels", str(testbed["wheelhouse"]), "--runtime-wheel", str(runtime_wheel), check=False)
    assert result.returncode == 1
    assert "MB at raspberry-pi-4's default context of 512 tokens, more than 400 MB less the 384 MB reserve" \
        in result.stderr
    assert not (tmp_path / "x.tar").exists()


def test_wheels_for_another_machine_are_refused(testbed, runtime_wheel, tmp_path):
    with pytest.raises(PackError, match="is not for aarch64"):
        pack("demo", "raspberry-pi-5", tmp_path / "x.tar", wheels=testbed["wheelhouse_x86_64"],
             runtime_wheel=runtime_wheel)


def fake_wheel(folder, name: str):
    import zipfile

    with zipfile.ZipFile(folder / name, "w") as z:
        z.writestr("onnxruntime/__init__.py", "")
    return folder / name


def test_a_jetson_pack_uses_the_boards_onnxruntime_or_the_users_gpu_wheel(testbed, runtime_wheel, tmp_path):
    """NVIDIA's onnxruntime-gpu for JetPack is not on the package index: the PyPI (CPU) wheel is never packed."""
    common = dict(python="3.11", wheels=testbed["wheelhouse"], runtime_wheel=runtime_wheel)
    system = pack("demo", "jetson-orin-nano", tmp_path / "system.tar", **common)
    assert system["onnxruntime"] == "system" and not [n for n in system["members"] if "onnxruntime" in n]
    gpu = fake_wheel(tmp_path, "onnxruntime_gpu-1.23.0-cp311-cp311-linux_aarch64.whl")
    given = pack("demo", "jetson-orin-nano", tmp_path / "gpu.tar", onnxruntime_wheel=gpu, **common)
    assert given["onnxruntime"] == gpu.name
    assert [n for n in given["members"] if "onnxruntime" in n] == [f"wheels/{gpu.name}"]
    wrong = fake_wheel(tmp_path, "onnxruntime_gpu-1.23.0-cp310-cp310-linux_x86_64.whl")
    with pytest.raises(PackError, match="is not for aarch64 with Python 3.11"):
        pack("demo", "jetson-orin-nano", tmp_path / "wrong.tar", onnxruntime_wheel=wrong, **common)
    with pytest.raises(PackError, match="is not for Python 3.10"):  # the profile's JetPack 6 Python
        pack("demo", "jetson-orin-nano", tmp_path / "py.tar", wheels=testbed["wheelhouse"],
             runtime_wheel=runtime_wheel)
