"""ARM64 under qemu-user: the runtime wheel installed into a venv inside a Debian arm64 sysroot, run as a Cortex-A72
(Raspberry Pi 4: no dot-product instructions) and a Cortex-A76 (Pi 5: dot-product), on bundles exported on x86.

The test bed (qemu, the sysroot, the aarch64 wheelhouse: conftest's `testbed`) is fetched by `.ci/arm64-setup`,
an install step of .ci/run, never here; without it these tests skip, except where EDGE_ARM64_REQUIRED=1 (CI)
makes that a failure.
What is compared with x86, position by position on a teacher-forced text and token by token greedily:
- fp32 bundles and int4 bundles of accuracy level 0 compute in fp32 on both: the same greedy tokens, logits within
  1e-4;
- a level-4 int4 bundle on the A72 falls back to fp32 compute: it equals the x86 level-0 bundle to 1e-4;
- a level-4 int4 bundle on the A76 takes the int8 path (it differs from fp32 compute) and, like int8 bundles
  everywhere, agrees with x86's int8-activation results on at least 90% of next tokens.
Each phase's time, the agreement figures and the first greedy difference are printed.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from boards import write_root
from conftest import free_port
from families import SMOLLM2, STORIES

HERE = Path(__file__).parent
CPUS = {"cortex-a72": ("pi4", "raspberry-pi-4"), "cortex-a76": ("pi5", "raspberry-pi-5")}
TEXT = ("Bread is one of the oldest prepared foods. To bake a simple loaf, mix flour, water, salt and yeast into a "
        "soft dough, then knead it for about ten minutes until it feels smooth and springs back when pressed. Leave "
        "it in a warm place to rise until it has doubled in size, which usually takes an hour. Shape the loaf, let "
        "it rise again, and bake it in a hot oven until the crust is golden brown and the bottom sounds hollow when "
        "tapped. If you are new to baking, start with a small batch, write down what you changed each time, and be "
        "patient: good bread takes practice.")
# SmolLM2 positions scored under each CPU: the A72 computes the whole 135M model in emulated fp32 (~1.6 s a token
# here), the A76 through int8 kernels about ten times faster.
SMOLLM2_SCORED = {"cortex-a72": 32, "cortex-a76": 128}
EXACT = 1e-4  # fp32 compute on two instruction sets: summation order alone (measured: 9e-5 on SmolLM2)
AGREEMENT = 0.90  # int8 activations are rounded differently by x86's and ARM's kernels
# SmolLM2's logits are closer together than stories260K's, so two roundings part more often, and how often depends
# on the x86 CPU's kernel too (measured on the A76: 92.1% against an Intel x86 with AMX, 89.0% against an AMD EPYC
# with AVX-512 VNNI); its fidelity to fp32 on the A76 is bounded on its own
# (test_the_default_preset_keeps_its_fidelity_and_speed_on_the_a76).
AGREEMENT_BY_MODEL = {"smollm2-int4": 0.85}


def report(config, line: str) -> None:
    """A line on the terminal even under -q and output capture, for CI's log."""
    with config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        config.pluginmanager.getplugin("terminalreporter").write_line(f"arm64: {line}")


@pytest.fixture(scope="module")
def arm_bed(testbed) -> dict[str, Path]:
    """The test bed, on an x86-64 host, with the real models there when CI requires the ARM64 runs."""
    if platform.machine() != "x86_64":
        pytest.skip("the emulation test bed is for x86-64 hosts")
    if os.environ.get("EDGE_ARM64_REQUIRED") == "1":  # CI: the real models must be there too, not skipped
        missing = [str(p) for p in (STORIES, SMOLLM2) if not p.exists()]
        assert not missing, f"EDGE_ARM64_REQUIRED=1 but {', '.join(missing)} is missing"
    return testbed


class Emulator:
    """qemu-user running the sysroot's python3.11 as one CPU, with a root that looks like that CPU's board."""

    def __init__(self, testbed: dict[str, Path], cpu: str, root: Path):
        self.qemu, self.cpu, self.root = testbed["qemu"], cpu, root
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env["QEMU_CPU"] = cpu
        self.cwd = root.parent  # not the checkout, whose edge/ would shadow the installed wheel on sys.path

    def command(self, python: Path, *args) -> list[str]:
        return [str(self.qemu), "-L", str(self.root), str(python), *map(str, args)]

    def run(self, python: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(python, *args), capture_output=True, text=True, env=self.env,
                              cwd=self.cwd, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{self.cpu}: {' '.join(map(str, args))} failed ({done.returncode}):\n"
                                 f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return done


def board_root(sysroot: Path, folder: Path, board: str) -> Path:
    """The sysroot's folders, linked, plus the board's /proc and device tree. The fake /proc/cpuinfo must name the
    emulated core: qemu 7.2 shows the guest the host's x86 cpuinfo, on which onnxruntime's cpuinfo crashes, and an
    A76 cpuinfo on an emulated A72 would send it down int8 kernels the CPU cannot run."""
    folder.mkdir(parents=True)
    for entry in sysroot.iterdir():
        if entry.name not in ("proc", ".done"):
            (folder / entry.name).symlink_to(entry)
    return write_root(folder, board)


@pytest.fixture(scope="module")
def emulators(arm_bed, tmp_path_factory) -> dict[str, Emulator]:
    base = tmp_path_factory.mktemp("arm64-roots")
    return {cpu: Emulator(arm_bed, cpu, board_root(arm_bed["sysroot"], base / cpu, board))
            for cpu, (board, _) in CPUS.items()}


@pytest.fixture(scope="module")
def arm_python(arm_bed, emulators, runtime_wheel, tmp_path_factory, pytestconfig) -> Path:
    """A venv made by the emulated python3.11 itself, with the runtime installed from its wheel and the
    wheelhouse by the venv's own pip, as on a board with no network."""
    started = time.perf_counter()
    venv = tmp_path_factory.mktemp("arm64") / "venv"
    emulator = emulators["cortex-a76"]
    # --without-pip: ensurepip would start pip as a child process, which qemu-user cannot execute (no binfmt_misc)
    emulator.run(arm_bed["sysroot"] / "usr/bin/python3.11", "-m", "venv", "--without-pip", venv)
    pip_wheel = next((arm_bed["sysroot"] / "usr/share/python-wheels").glob("pip-*.whl"))
    emulator.run(venv / "bin/python", pip_wheel / "pip", "install", "--no-index", "--no-compile", "--find-links",
                 arm_bed["wheelhouse"], runtime_wheel)
    # bytecode does not depend on the CPU: compiled here, it spares each emulated start most of its imports
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0", str(venv / "lib")], capture_output=True)
    installed = sorted(p.name.split("-")[0] for p in (venv / "lib/python3.11/site-packages").glob("*.dist-info"))
    report(pytestconfig, f"[{time.perf_counter() - started:.0f}s] venv in the arm64 sysroot with {len(installed)} "
                         f"distributions: {', '.join(installed)}")
    return venv / "bin/python"


@pytest.fixture(scope="module")
def jobs(exports) -> dict[str, dict]:
    """name -> what the probe runs: stories260K in every quantization, and the real SmolLM2-135M-Instruct int4."""
    stories = {"prompt": "Once upon a time", "greedy": 24, "text": (HERE / "data" / "story.txt").read_text()}
    smollm2 = {"prompt": "The capital of France is", "greedy": 6, "text": TEXT}
    return {
        "stories-fp32": {**stories, "bundle": exports.bundle("stories260K")},
        "stories-int8": {**stories, "bundle": exports.bundle("stories260K", "int8")},
        "stories-int4": {**stories, "bundle": exports.bundle("stories260K", "int4")},
        "stories-int4-level0": {**stories, "bundle": exports.bundle("stories260K", "int4", accuracy_level=0)},
        "stories-int4-fast": {**stories, "bundle": exports.bundle("stories260K", "int4-fast")},  # blocks of 64
        "smollm2-int4": {**smollm2, "bundle": exports.bundle("smollm2-135m", "int4")},
        "smollm2-int4-level0": {**smollm2, "bundle": exports.bundle("smollm2-135m", "int4", accuracy_level=0)},
        "smollm2-int4-plain": {**smollm2, "bundle": exports.bundle("smollm2-135m", "int4-plain")},
        "smollm2-fp32": {**smollm2, "bundle": exports.bundle("smollm2-135m")},
    }


# Where each job runs under emulation (the rest run on every emulated CPU); x86 runs them all. The SmolLM2 level-0
# and fp32 bundles are only x86's references; plain int4 is timed beside the default preset on the A76.
EMULATED_ON = {"smollm2-int4-level0": (), "smollm2-fp32": (), "smollm2-int4-plain": ("cortex-a76",)}


def probe(command: list[str], jobs: dict[str, dict], names: list[str], out: Path, scored: int, env=None,
          cwd=None) -> dict:
    out.mkdir(parents=True)
    wanted = [{"name": n, **{k: str(v) if k == "bundle" else v for k, v in jobs[n].items()},
               "score_tokens": scored if n.startswith("smollm2") else 0} for n in names]
    (out / "jobs.json").write_text(json.dumps(wanted))
    done = subprocess.run([*command, str(HERE / "arm64_probe.py"), str(out / "jobs.json"), str(out)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in (out / "results.json").read_text().splitlines()]
    return {r["name"]: {**r, "logits": np.load(out / f"{r['name']}.npy")} for r in results}


@pytest.fixture(scope="module")
def x86(jobs, tmp_path_factory) -> dict[str, dict]:
    """x86's results, computed once with the most SmolLM2 positions any CPU scores; each CPU is compared with the
    prefix it scored (the fast graph scores one position at a time, so a prefix is the very same numbers)."""
    full = probe([sys.executable], jobs, list(jobs), tmp_path_factory.mktemp("x86") / "all",
                 max(SMOLLM2_SCORED.values()))
    def prefix(name: str, result: dict, cpu: str) -> dict:
        return {**result, "logits": result["logits"][:SMOLLM2_SCORED[cpu]]} if name.startswith("smollm2") else result
    return {cpu: {name: prefix(name, r, cpu) for name, r in full.items()} for cpu in CPUS}


@pytest.fixture(scope="module")
def arm(jobs, emulators, arm_python, tmp_path_factory, pytestconfig) -> dict[str, dict]:
    """Every bundle under each emulated CPU, but for EMULATED_ON's."""
    out, results = tmp_path_factory.mktemp("arm"), {}
    for cpu, emulator in emulators.items():
        names = [n for n in jobs if cpu in EMULATED_ON.get(n, (cpu,))]
        started = time.perf_counter()
        results[cpu] = probe(emulator.command(arm_python), jobs, names, out / cpu, SMOLLM2_SCORED[cpu], emulator.env,
                             emulator.cwd)
        spent = ", ".join(f"{n} {r['load_s'] + r['greedy_s'] + r['score_s']:.0f}s" for n, r in results[cpu].items())
        report(pytestconfig, f"[{time.perf_counter() - started:.0f}s] {cpu} probes ({spent})")
    return results


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def first_difference(a: list[int], b: list[int]) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return "identical" if at is None else f"first differs at token {at + 1} of {len(a)}"


@pytest.mark.parametrize("cpu", CPUS)
def test_fp32_compute_matches_x86(cpu, arm, x86, pytestconfig):
    """fp32 bundles, level-0 int4 bundles, and on the A72 the level-4 bundles too (its fallback): x86's numbers."""
    pairs = [("stories-fp32", "stories-fp32"), ("stories-int4-level0", "stories-int4-level0")]
    if cpu == "cortex-a72":
        pairs += [("stories-int4", "stories-int4-level0"), ("smollm2-int4", "smollm2-int4-level0")]
    for name, reference in pairs:
        got, want = arm[cpu][name], x86[cpu][reference]
        difference = float(np.abs(got["logits"] - want["logits"]).max())
        greedy = first_difference(got["greedy"], want["greedy"])
        report(pytestconfig, f"{cpu} {name} against x86 {reference}: max |logit difference| {difference:.2g} over "
                             f"{len(got['logits'])} positions; greedy {greedy}")
        assert got["compute"] == "fp32", got["kernels"]
        assert got["logits"].shape == want["logits"].shape
        assert difference < EXACT, (name, difference)
        assert got["greedy"] == want["greedy"], (got["greedy_text"], want["greedy_text"])


@pytest.mark.parametrize("cpu", CPUS)
def test_int8_and_level4_bundles_agree_with_x86(cpu, arm, x86, pytestconfig):
    """The same bundle on x86 and ARM: x86 quantizes activations to int8 (VNNI); the A76 does too, with other
    kernels; the A72 computes in fp32. Each agrees with x86 on at least 90% of next tokens."""
    for name in ("stories-int8", "stories-int4", "stories-int4-fast", "smollm2-int4"):
        got, want = arm[cpu][name], x86[cpu][name]
        agreed = agreement(got["logits"], want["logits"])
        report(pytestconfig, f"{cpu} {name}: top-1 agreement with x86 {agreed:.1%} over {len(got['logits'])} "
                             f"positions, max |logit difference| {np.abs(got['logits'] - want['logits']).max():.2g}; "
                             f"greedy {first_difference(got['greedy'], want['greedy'])} "
                             f"({got['greedy_text']!r} / x86 {want['greedy_text']!r})")
        assert agreed >= AGREEMENT_BY_MODEL.get(name, AGREEMENT), (name, agreed)


def test_the_a76_runs_the_int8_kernels_and_the_a72_falls_back(arm, x86, pytestconfig):
    a72, a76 = arm["cortex-a72"], arm["cortex-a76"]
    # edge.kernels' account of each CPU (read from the cpuinfo the root gives it) ...
    assert (a72["smollm2-int4"]["compute"], a76["smollm2-int4"]["compute"]) == ("fp32", "int8")
    assert "no asimddp" in a72["smollm2-int4"]["kernels"] and "asimddp" in a76["smollm2-int4"]["kernels"]
    # ... and onnxruntime's: the A72's level-4 logits equal fp32 compute (test_fp32_compute_matches_x86), the A76's
    # do not
    for name in ("stories-int4", "smollm2-int4"):
        fp32 = x86["cortex-a76"][f"{name}-level0"]["logits"]
        assert np.abs(a76[name]["logits"] - fp32).max() > 1e-2  # int8 activations, not fp32 compute
    times = {cpu: arm[cpu]["smollm2-int4"]["score_s"] / arm[cpu]["smollm2-int4"]["scored_tokens"] for cpu in arm}
    report(pytestconfig, "SmolLM2 int4 (level 4) teacher-forced, emulated seconds per token: " +
           ", ".join(f"{cpu} {t:.2f}" for cpu, t in times.items()) + " (qemu's speed, not a board's)")
    assert {arm[cpu]["smollm2-int4"]["profile"] for cpu in arm} == {"raspberry-pi-4", "raspberry-pi-5"}


def test_the_default_preset_keeps_its_fidelity_and_speed_on_the_a76(arm, x86, pytestconfig):
    """The default int4 preset (8-bit output table and attention projections) through the A76's int8 kernels:
    its top-1 agreement with the fp32 bundle, and its emulated time per token against plain int4 (all 4-bit):
    8-bit weights dequantized on every call instead of an int8 kernel would show as several times slower."""
    a76, fp32 = arm["cortex-a76"], x86["cortex-a76"]["smollm2-fp32"]["logits"]
    agreed = {n: agreement(a76[n]["logits"], fp32) for n in ("smollm2-int4", "smollm2-int4-plain")}
    per_token = {n: a76[n]["score_s"] / a76[n]["scored_tokens"] for n in agreed}
    report(pytestconfig, f"cortex-a76 top-1 agreement with fp32 over {len(fp32)} positions: default int4 "
                         f"{agreed['smollm2-int4']:.1%}, int4-plain {agreed['smollm2-int4-plain']:.1%}; emulated s/token "
                         f"{per_token['smollm2-int4']:.3f} and {per_token['smollm2-int4-plain']:.3f}")
    assert agreed["smollm2-int4"] >= 0.75 and agreed["smollm2-int4"] > agreed["smollm2-int4-plain"], agreed
    assert per_token["smollm2-int4"] < 1.5 * per_token["smollm2-int4-plain"], per_token


@pytest.mark.parametrize("cpu", CPUS)
def test_doctor_names_the_board_and_kernel_path(cpu, emulators, arm_python, pytestconfig):
    emulator, started = emulators[cpu], time.perf_counter()
    out = emulator.run(arm_python, "-m", "edge.cli", "doctor", "--root", emulator.root).stdout
    kernel_line = next((line for line in out.splitlines() if line.startswith("int4 kernels")), "")
    report(pytestconfig, f"[{time.perf_counter() - started:.0f}s] {cpu} edge doctor: {kernel_line[:110]}")
    board, profile = CPUS[cpu]
    assert f"profile: {profile} (device-tree compatible" in out, out
    assert "architecture: aarch64" in out and "userland: aarch64" in out
    kernels = "fp32 compute with NEON fp32" if cpu == "cortex-a72" else "int8 activations with NEON dot-product"
    assert f"int4 kernels (a default export, accuracy level 4): {kernels}" in out, out


def test_every_runtime_module_imports_without_the_workstation_packages(emulators, arm_python):
    """Under emulation the venv holds the wheel and the runtime's dependencies only: no torch, transformers, onnx
    or optimum to fall back on."""
    script = ("import importlib, importlib.util, pkgutil, edge\n"
              "names = [m.name for m in pkgutil.walk_packages(edge.__path__, 'edge.') "
              "if not m.name.startswith('edge.export')]\n"
              "[importlib.import_module(n) for n in names]\n"
              "absent = [p for p in ('torch', 'transformers', 'onnx', 'optimum') if importlib.util.find_spec(p)]\n"
              "print(len(names), absent)")
    out = emulators["cortex-a76"].run(arm_python, "-c", script).stdout.split()
    assert int(out[0]) >= 20 and out[1] == "[]", out



@pytest.mark.parametrize("cpu", CPUS)
def test_serve_answers_a_chat_on_smollm2(cpu, emulators, arm_python, jobs, pytestconfig):
    emulator, port = emulators[cpu], free_port()
    started = time.perf_counter()
    command = emulator.command(arm_python, "-m", "edge.cli", "serve", jobs["smollm2-int4"]["bundle"], "--port", port)
    server = subprocess.Popen(command, env=emulator.env, cwd=emulator.cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        health = wait_for_health(port, server)
        body = json.dumps({"messages": [{"role": "system", "content": "Answer in one word."},
                                        {"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            reply = json.loads(response.read())
    finally:
        server.terminate()
        try:
            log = server.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            log = server.communicate()[0]
    content = reply["choices"][0]["message"]["content"]
    report(pytestconfig, f"[{time.perf_counter() - started:.0f}s] {cpu} edge serve: /health {health['status']}, "
                         f"chat reply {content!r}")
    assert health["status"] == "ok", log[-2000:]
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1 and content.strip()


def wait_for_health(port: int, server: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"edge serve exited ({server.returncode}): {server.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                health = json.loads(response.read())
                if health.get("status") == "ok":
                    return health
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"edge serve did not report ok on /health within {timeout:.0f} s")


def test_a_pi5_pack_installs_and_serves_under_emulation(arm_bed, emulators, runtime_wheel, tmp_path, pytestconfig):
    """The aarch64 pack installed by the packed installer running on the emulated Pi 5's own python3.11, from an
    empty prefix with pip's index unreachable, then served. (The shell half of install.sh is the host's sh, so the
    installer is started the way install.sh starts it; EDGE_INSTALL_LAUNCHER lets it start the board's programs
    under qemu.)"""
    from edge.pack import pack

    started, emulator = time.perf_counter(), emulators["cortex-a76"]
    archive = tmp_path / "pi5.tar"
    manifest = pack("demo", "raspberry-pi-5", archive, wheels=arm_bed["wheelhouse"], runtime_wheel=runtime_wheel)
    wheel = tmp_path / "edge_llm.whl"
    with tarfile.open(archive) as tar:
        wheel.write_bytes(tar.extractfile(f"wheels/{manifest['runtime_wheel']}").read())
    prefix = tmp_path / "opt" / "edge-llm"
    env = {**emulator.env, "EDGE_INSTALL_LAUNCHER": f"{emulator.qemu} -L {emulator.root}",
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1"}
    python = arm_bed["sysroot"] / "usr/bin/python3.11"
    code = (f"import sys; sys.path.insert(0, {str(wheel)!r}); from edge.install import main; "
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run(emulator.command(python, "-c", code, archive, "--prefix", prefix, "--python", python,
                                           "--no-service"), capture_output=True, text=True, env=env,
                          cwd=emulator.cwd, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    version = prefix / "versions" / os.readlink(prefix / "current").split("/")[-1]
    assert "self-check: loaded" in done.stdout and (version / "COMPLETE").exists()
    header = (version / "venv/bin/python").resolve().read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[18:20] == b"\xb7\x00"  # e_machine EM_AARCH64: the board's python
    port = free_port()
    server = subprocess.Popen(emulator.command(version / "venv/bin/python", "-m", "edge.cli", "serve",
                                               version / "pack/bundle", "--port", port),
                              env=emulator.env, cwd=emulator.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        health = wait_for_health(port, server)
    finally:
        server.terminate()
        try:
            server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    report(pytestconfig, f"[{time.perf_counter() - started:.0f}s] cortex-a76: raspberry-pi-5 pack installed by its "
                         f"own installer under emulation, /health {health['status']}")
    assert health["status"] == "ok"
