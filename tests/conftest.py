"""Session-wide fixtures: tiny checkpoints of each family and their bundles, each built and exported once."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from families import BY_NAME, SMOLLM2, STORIES, build_checkpoint, shared

# Every cache a test run writes (verify records, optimized models, onnxruntime's telemetry id, Hugging Face's) goes
# to one temporary folder, whatever the environment says, and nothing is fetched from a hub.
CACHE = Path(tempfile.mkdtemp(prefix="edge-test-cache-"))
os.environ.update(XDG_CACHE_HOME=str(CACHE), HF_HOME=str(CACHE / "huggingface"), HF_HUB_OFFLINE="1")
# the peer comparison lives in benchmarks/, outside the runtime package: its tests import it from there
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def pytest_unconfigure(config):
    shutil.rmtree(CACHE, ignore_errors=True)


class Exports:
    """Builds checkpoints and exports bundles on first use, then hands out the same folders."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[tuple, Path] = {}

    def checkpoint(self, name: str) -> Path:
        if name == "stories260K":
            return shared(STORIES)
        key = ("checkpoint", name)
        if key not in self.done:
            self.done[key] = self._smollm2() if name == "smollm2-135m" else build_checkpoint(BY_NAME[name],
                                                                                          self.root / "hf" / name)
        return self.done[key]

    def _smollm2(self) -> Path:
        """The real SmolLM2-135M-Instruct, written from ../shared's GGUF by its own tool (~25 s, once a run)."""
        tool = shared(SMOLLM2) / "tools" / "gguf_to_hf.py"
        out = self.root / "hf" / "smollm2-135m"
        subprocess.run([sys.executable, str(tool), str(out)], check=True, capture_output=True)
        return out

    def bundle(self, name: str, quant: str = "fp32", accuracy_level: int = 4, graph: str = "auto") -> Path:
        """accuracy_level: the presets' MatMulNBits compute; 4 (int8 activations where the CPU has them) is the
        default of every export, 0 (fp32 compute) is what tests that restate the arithmetic exactly need."""
        from edge.export.pipeline import export

        level = accuracy_level if quant not in ("fp32", "fp16") else 4
        key = ("bundle", name, quant, level, graph)
        if key not in self.done:
            out = self.root / "bundles" / (f"{name}-{quant}" + ("" if level == 4 else f"-level{level}")
                                           + ("" if graph == "auto" else f"-{graph}"))
            if name == "smollm2-135m" and level != 4 and quant not in ("fp32", "fp16"):
                # its int4 export takes minutes of CI, and the level changes no weight: the level-4 bundle,
                # relabelled (tiny families still export at level 0: tests/test_export.py tests that path)
                self.done[key] = at_accuracy_level(self.bundle(name, quant, 4, graph), out, level)
                return self.done[key]
            # The real SmolLM2's check scores a prefix of the held-out text: its fast graph scores a token at a time
            export(str(self.checkpoint(name)), str(out), quant=quant, accuracy_level=level, graph=graph,
                   held_out_tokens=512 if name == "smollm2-135m" else None)
            self.done[key] = out
        return self.done[key]


def at_accuracy_level(bundle: Path, out: Path, level: int) -> Path:
    """A copy of a quantized bundle whose MatMulNBits compute at another accuracy level, with its manifest's level and
    checksums to match (its quantization figures stay those measured at the bundle's own level)."""
    import onnx

    from edge.bundle import read_manifest
    from edge.export.bundle import write_manifest

    shutil.copytree(bundle, out)
    model = onnx.load(out / "model.onnx", load_external_data=False)  # the weights file, if any, is untouched
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        next(a for a in node.attribute if a.name == "accuracy_level").i = level
    onnx.save(model, out / "model.onnx")
    manifest = read_manifest(out / "manifest.json")
    manifest["quantization"]["accuracy_level"] = level
    write_manifest(out, manifest)
    return out


def with_other_weights(bundle: Path, out: Path, seed: int) -> Path:
    """A copy of a bundle with its weights in model.onnx.data, each float weight nudged by a seed's noise: the
    graph file comes out byte for byte the same for every seed, as for two checkpoints of one architecture."""
    import onnx
    from onnx import numpy_helper

    from edge.bundle import read_manifest
    from edge.export.bundle import write_manifest

    shutil.copytree(bundle, out)
    model = onnx.load(out / "model.onnx")
    rng = np.random.default_rng(seed)
    for tensor in (t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1):
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(array * (1 + 0.1 * rng.standard_normal(array.shape, np.float32)),
                                                tensor.name))
    onnx.save_model(model, out / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    write_manifest(out, read_manifest(out / "manifest.json"))
    return out


def drafts_pay(decoder) -> None:
    """Pin the decoder's pass costs as on a CPU where extra rows are cheap. Whether a draft pays is otherwise this
    CPU's call (a loaded 2-core CI runner timed 2-row passes too dear to draft at all), and a test of drafting must
    draft on every machine."""
    from edge.generate import pass_costs

    pass_costs(decoder).set_from({rows: 1.0 + 0.05 * (rows - 1) for rows in range(1, 10)})


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))


TESTBED = Path(os.environ.get("EDGE_ARM64_DIR") or Path.home() / ".cache" / "edge-llm-ci" / "arm64") / "testbed.env"


@pytest.fixture(scope="session")
def testbed() -> dict[str, Path]:
    """What .ci/arm64-setup fetched (qemu, the arm64 sysroot, the aarch64 and x86-64 wheelhouses): tests never
    fetch anything. A skip without it, a failure where EDGE_ARM64_REQUIRED=1 (CI)."""
    if not TESTBED.exists():
        message = f"no test bed at {TESTBED.parent}: run `bash .ci/arm64-setup` first (it downloads ~200 MB)"
        if os.environ.get("EDGE_ARM64_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    values = dict(line.split("=", 1) for line in TESTBED.read_text().splitlines() if "=" in line)
    return {k: Path(v) for k, v in values.items()}


@pytest.fixture(scope="session")
def runtime_wheel(tmp_path_factory) -> Path:
    """edge-llm's wheel, built from a copy of the sources as `edge pack` builds it."""
    from edge.pack import build_runtime_wheel

    return build_runtime_wheel(tmp_path_factory.mktemp("wheel"))


def greedy_by_hand(engine, prompt: list[int], n: int) -> list[int]:
    """Up to n greedy tokens taken straight from the model's logits, one forward pass per token, stopping after an
    eos id: what a greedy stream of the engine must yield."""
    cache = engine.decoder.new_state()
    logits, tokens = engine.decoder.forward(np.array(prompt), cache)[-1], []
    while len(tokens) < n and (not tokens or tokens[-1] not in engine.eos_ids):
        tokens.append(int(np.argmax(logits)))
        logits = engine.decoder.forward(np.array([tokens[-1]]), cache)[-1]
    return tokens


def free_port() -> int:
    """A loopback port nothing listens on, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_edge(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The `edge` command as a user runs it, in a fresh process."""
    # Bytes in and out: text mode would turn a generated "\r\n" into "\n".
    result = subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, timeout=300,
                            input=None if stdin is None else stdin.encode())
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode(errors="replace")
    if check and result.returncode != 0:
        raise AssertionError(f"edge {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result
