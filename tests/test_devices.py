"""Device profiles and detection: fake roots of every board, schema errors, sessions from every profile."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from boards import BOARDS, write_root
from conftest import run_edge, with_other_weights

import edge
from edge.devices import ProfileError, all_profiles, choose_profile, load_profile, profile_names, read_device
from edge.engine import resolve

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin",
            "generic-arm64", "generic-x86-64", "nvidia-gpu"}


@pytest.mark.parametrize("board", list(BOARDS))
def test_detection_picks_the_board(tmp_path, board):
    device = read_device(write_root(tmp_path, board))
    choice = choose_profile(device)
    assert choice.profile.name == BOARDS[board][0], choice.reason
    assert choice.reason


def test_detection_reads_the_board_facts(tmp_path):
    pi5 = read_device(write_root(tmp_path / "pi5", "pi5"))
    assert (pi5.arch, pi5.cores, pi5.performance_cores, pi5.dot_product) == ("aarch64", 4, 4, True)
    assert pi5.cpu_names == ["Cortex-A76"] and pi5.mem_total_mb == 8053
    pi4 = read_device(write_root(tmp_path / "pi4", "pi4"))
    assert not pi4.dot_product and pi4.compatible == ("raspberrypi,4-model-b", "brcm,bcm2711")
    nano = read_device(write_root(tmp_path / "nano", "jetson-nano-l4t"))
    assert nano.tegra_release.startswith("# R32 (release), REVISION: 7.1")
    assert nano.l4t == "R32.7.1" and "L4T R32.7.1" in choose_profile(nano).reason


def test_an_x86_machine_with_cuda_gets_the_gpu_profile(tmp_path):
    device = read_device(write_root(tmp_path, "x86-pc"))
    assert choose_profile(device, gpu=True).profile.name == "nvidia-gpu"
    assert choose_profile(device, gpu=False).profile.name == "generic-x86-64"


def test_cgroup_limit_is_read(tmp_path):
    device = read_device(write_root(tmp_path, "pi4", cgroup_limit_mb=512))
    assert device.cgroup_limit_mb == 512


def test_every_shipped_profile_validates():
    profiles = {p.name: p for p in all_profiles()}
    assert REQUIRED <= set(profiles)
    for p in profiles.values():
        assert p.description and p.providers and p.cpu.spinning_reason, p.name
        assert p.providers[-1].name == "CPUExecutionProvider", f"{p.name}: CPU must remain the last resort"
    assert profiles["jetson-orin-nano"].provider_names[0] == "CUDAExecutionProvider"
    assert "Python 3.10" in profiles["jetson-nano"].notes


@pytest.mark.parametrize("text, message", [
    ('name = "x"\nproviders = [{name = "CPUExecutionProvider"}]\nthreads = 4\n', "unknown key 'threads'"),
    ('[cpu]\nintra_op_threads = "four"\n', "'cpu.intra_op_threads' must be int, not str"),
    ('[cpu]\nallow_spinning = 1\n', "'cpu.allow_spinning' must be bool"),
    ('[[providers]]\nname = "OpenVINOExecutionProvider"\n', "unknown provider"),
    ('[[providers]]\nname = "CPUExecutionProvider"\nthreads = 2\n', "unknown key 'providers[0].threads'"),
    ('[session]\ngraph_optimization = "max"\n', "'session.graph_optimization' must be one of"),
    ('[export]\nquant = "int3"\n', "'export.quant' must be one of"),
    ('[export]\naccuracy_level = 0\n', "'export.accuracy_level' is no longer a profile setting: every int4 export"),
    ('[memory]\nbudget = 100\n', "unknown key 'memory.budget'"),
    ('name = \n', "cannot read profile"),
    ('[server]\ncors_origins = "http://kiosk.local"\n', "'server.cors_origins' must be a list"),
    ('[server]\ncors_origins = [3000]\n', "'server.cors_origins[0]' must be str, not int"),
])
def test_malformed_profiles_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_unknown_profile_name():
    with pytest.raises(ProfileError, match="choose one of"):
        load_profile("raspberry-pi-9")


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_builds_a_session_here(name, capsys):
    engine = edge.load("demo", profile=name)
    assert engine.decoder.providers == ["CPUExecutionProvider"]
    assert engine.generate("Once upon a time", max_tokens=8)
    absent = [p for p in engine.profile.provider_names if p != "CPUExecutionProvider"]
    edge.load("demo", profile=name)  # a second load: the warning is not repeated
    warnings = [line for line in capsys.readouterr().err.splitlines() if f"profile {name}:" in line]
    assert len(warnings) == (1 if absent else 0)


def test_a_users_own_profile_file(tmp_path):
    path = tmp_path / "my-board.toml"
    path.write_text('name = "my-board"\n[[providers]]\nname = "CPUExecutionProvider"\n[cpu]\nintra_op_threads = 1\n'
                    '[memory]\ndefault_context = 128\n')
    engine = edge.load("demo", profile=path)
    assert engine.profile.name == "my-board" and engine.context_length == 128
    assert run_edge("run", "demo", "Once", "--max-tokens", "3", "--profile", str(path)).stdout.strip()


def test_optimized_model_cache_gives_the_same_output(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = edge.load("demo", profile="raspberry-pi-4").generate("Once upon a time", max_tokens=20)
    cached = list((tmp_path / "edge-llm" / "optimized").glob("*.onnx"))
    assert len(cached) == 1 and not list(cached[0].parent.glob("*.partial"))
    assert edge.load("demo", profile="raspberry-pi-4").generate("Once upon a time", max_tokens=20) == first
    # A cache entry cut short (power lost while writing it) is rebuilt, not fatal.
    cached[0].write_bytes(cached[0].read_bytes()[:100])
    assert edge.load("demo", profile="raspberry-pi-4").generate("Once upon a time", max_tokens=20) == first
    assert cached[0].stat().st_size > 100


def test_the_optimized_model_cache_tells_apart_models_that_differ_only_in_their_weights(tmp_path, monkeypatch):
    """Two checkpoints of one architecture have the same graph file once their weights are in model.onnx.data: the
    cache must not hand the second the first one's optimized graph, weights and all."""
    first = with_other_weights(resolve("demo"), tmp_path / "first", seed=1)
    second = with_other_weights(resolve("demo"), tmp_path / "second", seed=2)
    assert (first / "model.onnx").read_bytes() == (second / "model.onnx").read_bytes()
    ids = list(range(3, 40))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    scores = [edge.load(b, profile="raspberry-pi-4").score(ids) for b in (first, second)]
    assert len(list((tmp_path / "cache" / "edge-llm" / "optimized").glob("*.onnx"))) == 2
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh"))
    np.testing.assert_array_equal(edge.load(second, profile="raspberry-pi-4").score(ids), scores[1])
    assert np.abs(scores[1] - scores[0]).max() > 1e-2


def test_export_for_a_profile_records_the_target(exports, tmp_path, capsys):
    from edge.export.pipeline import export

    manifest = export(str(exports.checkpoint("stories260K")), str(tmp_path / "pi5"), profile="raspberry-pi-5")
    assert manifest["target"] == {"profile": "raspberry-pi-5"}
    assert manifest["quantization"]["method"] == "int4" and manifest["quantization"]["accuracy_level"] == 4
    assert edge.load(tmp_path / "pi5", profile="raspberry-pi-4").generate("Once", max_tokens=5)
    assert "exported for raspberry-pi-5; this board uses profile raspberry-pi-4" in capsys.readouterr().err
    # doctor on a Pi 4's files: no dot-product instructions, so onnxruntime computes this bundle in fp32
    root = write_root(tmp_path / "pi4", "pi4")
    out = run_edge("doctor", "--root", str(root), "--bundle", str(tmp_path / "pi5")).stdout
    assert "profile: raspberry-pi-4 (device-tree compatible 'raspberrypi,4-model-b'" in out
    assert "kernels for this bundle: fp32 compute with NEON fp32 (the CPU has no dot-product" in out
    assert "exported for raspberry-pi-5" in out


@pytest.mark.parametrize("userland, refused", [("armv7l", True), ("aarch64", False)])
def test_doctor_refuses_a_32_bit_userland_on_a_64_bit_kernel(tmp_path, userland, refused):
    """Raspberry Pi OS 32-bit on a Pi 4 or 5 runs a 64-bit kernel (`uname -m` aarch64) under armhf programs:
    onnxruntime has no wheels for those."""
    root = write_root(tmp_path / "pi", "pi4", userland=userland)
    assert read_device(root).userland == userland
    out = run_edge("doctor", "--root", str(root)).stdout
    assert f"userland: {userland}" in out
    message = "this is a 32-bit (armv7l) userland (the CPU itself is aarch64): onnxruntime publishes no 32-bit wheels"
    assert (f"warning: {message}" in out) == refused
    assert ("warning: " in out) == refused  # the 64-bit userland has nothing to warn about
    # where onnxruntime cannot be installed at all (there is none for armhf), doctor still says why, in one line
    block = "import sys; sys.modules['onnxruntime'] = None; from edge.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", block, "doctor", "--root", str(root)], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (message in done.stderr) == refused and ("pip install onnxruntime" in done.stderr) != refused


@pytest.mark.parametrize("board, level, compute, kernels", [
    ("pi4", 4, "fp32", "NEON fp32"), ("pi5", 4, "int8", "NEON dot-product (SDOT)"), ("pi5", 0, "fp32", "NEON"),
    ("orin-nx", 4, "int8", "NEON dot-product (SDOT)"), ("jetson-nano-l4t", 4, "fp32", "NEON fp32"),
    ("x86-pc", 4, "int8", "AVX2"),
])
def test_kernel_path_follows_the_cpu_and_the_bundle(tmp_path, board, level, compute, kernels):
    from edge.kernels import kernel_path

    path = kernel_path(read_device(write_root(tmp_path / board, board)), "int4", level)
    assert (path.compute, path.kernels) == (compute, kernels), path
    assert kernel_path(read_device(write_root(tmp_path / board, board)), "int4", 4, "CUDAExecutionProvider").compute \
        == "provider"


def test_doctor_on_this_machine_and_cli_listing():
    out = run_edge("doctor", "--bundle", "demo").stdout
    assert "profile:" in out and "would use: CPUExecutionProvider" in out and "memory at 512 tokens" in out
    assert "int4 kernels (a default export, accuracy level 4): " in out and "kernels for this bundle: " in out
    listing = run_edge("devices").stdout
    assert all(name in listing for name in REQUIRED)
    shown = run_edge("devices", "show", "raspberry-pi-5").stdout
    assert tomllib.loads(shown)["name"] == "raspberry-pi-5"


def test_jetson_requirements_match_the_runtime_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {d for d in project["dependencies"] if not d.startswith("onnxruntime")}
    listed = {line.strip() for line in (ROOT / "devices" / "jetson-requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert listed == runtime


def test_no_deps_route_keeps_a_jetson_onnxruntime(tmp_path):
    """JetPack's onnxruntime-gpu provides the `onnxruntime` module; the README route must not replace it."""
    standin = tmp_path / "standin"
    (standin / "onnxruntime").mkdir(parents=True)
    (standin / "onnxruntime" / "__init__.py").write_text('__version__ = "1.99.0+jetson-standin"\n')
    (standin / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = '
                                            '"setuptools.build_meta"\n[project]\nname = "onnxruntime-gpu"\n'
                                            'version = "1.99.0"\n[tool.setuptools]\npackages = ["onnxruntime"]\n')
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [str(standin)], check=True)
    # README, 'On a Jetson': the package without its dependencies, then everything but onnxruntime.
    subprocess.run(pip + ["--no-deps", str(ROOT)], check=True)
    subprocess.run(pip + ["-r", str(ROOT / "devices" / "jetson-requirements.txt")], check=True)
    probe = ("import importlib.metadata as m, importlib.util as u, onnxruntime, tokenizers, starlette\n"
             "print(onnxruntime.__version__, m.version('edge-llm'), bool(u.find_spec('edge')))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    assert out.split() == ["1.99.0+jetson-standin", "0.1.0", "True"]
    installed = json.loads(subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                                          capture_output=True, text=True, check=True).stdout)
    assert "onnxruntime" not in {p["name"].lower() for p in installed}  # the CPU wheel never came in
