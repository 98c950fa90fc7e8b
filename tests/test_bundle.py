"""Bundles are verified before loading: tampering, missing files and newer formats are refused by name."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import run_edge

import edge
from edge.bundle import BundleError, open_bundle, verify_files
from edge.engine import DEMO


@pytest.fixture
def bundle(tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(DEMO, copy)
    return copy


def edit_manifest(bundle, **changes):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_intact_bundle_loads_and_verifies(bundle):
    assert edge.load(bundle, verify="all").generate("Once", max_tokens=3)
    assert "files verified" in run_edge("verify", str(bundle)).stdout


def test_flipped_byte_is_refused(bundle):
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.onnx").write_bytes(data)
    with pytest.raises(BundleError, match="model.onnx fails its sha256"):
        edge.load(bundle)
    result = run_edge("verify", str(bundle), check=False)
    assert result.returncode == 1 and "model.onnx fails its sha256" in result.stderr


def test_removed_file_is_refused(bundle):
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json .*missing"):
        edge.load(bundle)


def test_truncated_file_is_refused_without_hashing(bundle):
    with open(bundle / "model.onnx", "r+b") as f:
        f.truncate(100)
    with pytest.raises(BundleError, match="model.onnx has 100 bytes"):
        edge.load(bundle, verify="changed")


@pytest.mark.parametrize("version, ok", [("1.0", True), ("1.7", True), ("2.0", False), ("0.9", False), ("x", False)])
def test_format_version(bundle, version, ok):
    edit_manifest(bundle, format_version=version)
    if ok:
        edge.load(bundle)
    else:
        with pytest.raises(BundleError, match="format_version"):
            edge.load(bundle)


def test_missing_field_is_named(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["onnx"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lacks field.*onnx"):
        edge.load(bundle)


def test_file_names_cannot_escape_the_bundle(bundle, tmp_path):
    (tmp_path / "outside").write_text("x")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["../outside"] = {"size": 1, "sha256": "0" * 64}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        edge.load(bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle"):
        edge.load(tmp_path)


def test_later_loads_rehash_only_what_changed(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(verify_files(bundle, manifest, full=True)) == sorted(manifest["files"])
    assert verify_files(bundle, manifest) == []  # recorded: nothing re-hashed
    tokenizer = bundle / "tokenizer.json"
    os.utime(tokenizer, ns=(0, tokenizer.stat().st_mtime_ns + 10**9))  # touched: re-hash that one file
    assert verify_files(bundle, manifest) == ["tokenizer.json"]
    # Same size, new content, new mtime: the re-hash catches it.
    data = bytearray(tokenizer.read_bytes())
    data[10] ^= 0x20
    tokenizer.write_bytes(data)
    with pytest.raises(BundleError, match="tokenizer.json fails"):
        open_bundle(bundle)
