"""Read a bundle folder and check it against its manifest before anything is loaded from it.

A bundle is the one contract between the exporter and the runtime: `manifest.json` plus the files it lists,
each with its size and sha256. Hashing hundreds of MB costs seconds on a Pi 4, so the result of a full check is
recorded per file (size, mtime, hash) in the user's cache and later loads re-hash only files that changed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_MAJOR = 1  # the newest major format this runtime reads; a newer minor only adds optional fields
REQUIRED = ("format_version", "family", "model", "onnx", "tokenizer", "generation", "files")


class BundleError(Exception):
    """A bundle that cannot be trusted or read; the message names the file or field."""


@dataclass(frozen=True)
class Bundle:
    path: Path  # the bundle folder
    manifest: dict  # the parsed manifest.json

    def file(self, name: str) -> Path:
        return self.path / name

    def model_files(self) -> list[str]:
        """The graph file and its external weights (model.onnx, model.onnx.data), as the manifest lists them."""
        graph = self.manifest["onnx"]["file"]
        return sorted(name for name in self.manifest["files"] if name.startswith(graph))

    def model_sha256(self) -> str:
        """What identifies the model's graph and weights together. The graph file alone does not: with its weights
        in model.onnx.data it holds only their names and offsets, the same for every checkpoint of one
        architecture. A single-file model's is that file's sha256, as it always was."""
        files = self.manifest["files"]
        names = self.model_files()
        if len(names) == 1:
            return files[names[0]]["sha256"]
        return hashlib.sha256("".join(f"{n}:{files[n]['sha256']}\n" for n in names).encode()).hexdigest()


def open_bundle(path: str | Path, verify: str = "changed") -> Bundle:
    """Read the manifest and check the files: verify is "all", "changed" (default) or "none"."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST}); make one with `edge export`")
    manifest = read_manifest(path / MANIFEST)
    if verify != "none":
        verify_files(path, manifest, full=verify == "all")
    return Bundle(path, manifest)


def read_manifest(file: Path) -> dict:
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{file}: unreadable manifest: {e}") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{file}: the manifest must be a JSON object")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{file}: manifest lacks field(s) {', '.join(missing)}")
    check_format_version(manifest["format_version"], file)
    return manifest


def check_format_version(version: object, file: Path) -> None:
    try:
        major, _minor = (int(part) for part in str(version).split("."))
    except ValueError:
        raise BundleError(f"{file}: field format_version {version!r} is not MAJOR.MINOR") from None
    if major > FORMAT_MAJOR or major < 1:
        raise BundleError(f"{file}: field format_version {version} is not supported by this runtime "
                          f"(reads {FORMAT_MAJOR}.x); upgrade edge-llm or re-export the bundle")


def verify_files(path: Path, manifest: dict, full: bool = False) -> list[str]:
    """Check every listed file's size and sha256; returns the names that were re-hashed."""
    record = {} if full else _load_record(path)
    hashed = []
    for name, want in manifest["files"].items():
        file = _inside(path, name)
        if not file.is_file():
            raise BundleError(f"{path}: file {name} listed in the manifest is missing")
        stat = file.stat()
        if stat.st_size != want["size"]:
            raise BundleError(f"{path}: file {name} has {stat.st_size} bytes, the manifest says {want['size']}")
        if record.get(name) == [stat.st_size, stat.st_mtime_ns, want["sha256"]]:
            continue
        if sha256_file(file) != want["sha256"]:
            raise BundleError(f"{path}: file {name} fails its sha256 check (corrupt or modified)")
        record[name] = [stat.st_size, stat.st_mtime_ns, want["sha256"]]
        hashed.append(name)
    if hashed:
        _save_record(path, record)
    return hashed


def sha256_file(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _inside(root: Path, name: str) -> Path:
    """A manifest names files relative to the bundle; one that points outside it is refused."""
    file = (root / name).resolve()
    if root.resolve() not in file.parents:
        raise BundleError(f"{root}: manifest file name {name!r} points outside the bundle")
    return file


def cache_dir(name: str) -> Path:
    """edge-llm's cache folder `name` (verified, optimized, peers), under $XDG_CACHE_HOME or ~/.cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-llm" / name


def _record_file(path: Path) -> Path:
    cache = cache_dir("verified")
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache / f"{key}.json"


def _load_record(path: Path) -> dict:
    try:
        return json.loads(_record_file(path).read_text())
    except (OSError, ValueError):
        return {}


def _save_record(path: Path, record: dict) -> None:
    # Best effort: a read-only home only costs a re-hash next time.
    try:
        file = _record_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(file)
    except OSError:
        pass
