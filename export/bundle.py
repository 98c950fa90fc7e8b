"""Write a bundle: the model, tokenizer and chat template, and a manifest with every file's size and sha256.

The bundle is assembled in a temporary folder beside the target and renamed into place at the end, so an
interrupted or failed export never leaves a half-written bundle behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx

FORMAT_VERSION = "1.0"  # major.minor: a runtime refuses a newer major; a new minor only adds optional fields
# Above this, weights go to model.onnx.data. onnxruntime maps that file instead of parsing the weights out of one
# protobuf and copying them: SmolLM2-135M int4 (99 MB) loads in 0.24-0.44 s instead of 0.43-0.85 s, with 14-17 MB
# less peak RSS (README, "Load time"). A tiny model keeps one file. (Protobuf also caps a file at 2 GB.)
EXTERNAL_DATA_BYTES = 4 << 20


@contextmanager
def staging(out: Path, force: bool = False):
    """A scratch folder next to `out`; the caller fills `<scratch>/bundle`, which becomes `out` on success."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (scratch / "bundle").mkdir()
        yield scratch
        old = scratch / "old"
        if out.exists():
            out.rename(old)  # only after the new bundle is complete
        try:
            (scratch / "bundle").rename(out)
        except OSError:
            if old.exists():
                old.rename(out)  # the bundle that was there stays, rather than going with the scratch folder
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_model(model: onnx.ModelProto, folder: Path) -> list[str]:
    """model.onnx, with its weights beside it in model.onnx.data when large; returns the file names."""
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        # onnx writes the weights owner-only (0600): a service running as another user could not read them
        shutil.copymode(folder / "model.onnx", folder / "model.onnx.data")
        return ["model.onnx", "model.onnx.data"]
    onnx.save_model(model, folder / "model.onnx")
    return ["model.onnx"]


def file_entry(file: Path) -> dict:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"size": file.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Hash every file in the folder into the manifest and write manifest.json (last, atomically)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {"format_version": FORMAT_VERSION, **manifest,
                "files": {p.relative_to(folder).as_posix(): file_entry(p) for p in files}}
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "manifest.json")
    return manifest
