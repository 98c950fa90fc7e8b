"""Session-wide fixtures: tiny checkpoints of each family and their bundles, each built and exported once."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from families import BY_NAME, STORIES, build_checkpoint, shared

# Every cache a test run writes (verify records, optimized models, onnxruntime's telemetry id, Hugging Face's) goes
# to one temporary folder, whatever the environment says, and nothing is fetched from a hub.
CACHE = Path(tempfile.mkdtemp(prefix="edge-test-cache-"))
os.environ.update(XDG_CACHE_HOME=str(CACHE), HF_HOME=str(CACHE / "huggingface"), HF_HUB_OFFLINE="1")


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
            self.done[key] = build_checkpoint(BY_NAME[name], self.root / "hf" / name)
        return self.done[key]

    def bundle(self, name: str, quant: str = "fp32") -> Path:
        from export.pipeline import export

        key = ("bundle", name, quant)
        if key not in self.done:
            out = self.root / "bundles" / f"{name}-{quant}"
            export(str(self.checkpoint(name)), str(out), quant=quant)
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))


def greedy_by_hand(engine, prompt: list[int], n: int) -> list[int]:
    """Up to n greedy tokens taken straight from the model's logits, one forward pass per token, stopping after an
    eos id: what a greedy stream of the engine must yield."""
    cache = engine.model.new_cache()
    logits, tokens = engine.model.forward(cache, np.array(prompt))[-1], []
    while len(tokens) < n and (not tokens or tokens[-1] not in engine.eos_ids):
        tokens.append(int(np.argmax(logits)))
        logits = engine.model.forward(cache, np.array([tokens[-1]]))[-1]
    return tokens


def run_edge(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The `edge` command as a user runs it, in a fresh process."""
    # Bytes in and out: text mode would turn a generated "\r\n" into "\n".
    result = subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, timeout=300,
                            input=None if stdin is None else stdin.encode())
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode(errors="replace")
    if check and result.returncode != 0:
        raise AssertionError(f"edge {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result
