"""The pack archive `edge pack` writes and `edge install` reads: a plain tar whose first member, edge-pack.json,
lists the size and sha256 of every other member, optionally signed (ed25519) in edge-pack.sig.

Reading is the dangerous half: an archive is data from elsewhere. Nothing is written until the whole archive has
been checked, and then only regular files and folders, each inside the target folder, each listed in the
manifest with the right size and hash. A checksum inside the archive proves the archive is whole, not who made it:
that is the signature's job, checked against keys the installing machine already trusts.

Standard library only (plus `cryptography` for signatures): the installer runs this from the packed wheel with
the board's own python3, before any environment exists.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import posixpath
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "edge-pack.json"
SIGNATURE = "edge-pack.sig"
FORMAT = 1
CHUNK = 1 << 20


class ArchiveError(ValueError):
    """An archive that is damaged, unsafe, or not signed by a trusted key; nothing was written."""


@dataclass(frozen=True)
class Member:
    name: str  # path inside the archive, "/"-separated, relative
    source: Path  # the file it is written from


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def write(out: Path, members: list[Member], info: dict, sign_key: Path | None = None) -> dict:
    """The archive at out (written beside it, then renamed), with its manifest; returns the manifest."""
    manifest = {"format": FORMAT, **info,
                "members": {m.name: {"size": m.source.stat().st_size, "sha256": sha256_of(m.source)} for m in members}}
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    partial = out.with_name(out.name + ".partial")
    if not out.parent.is_dir():
        raise ArchiveError(f"{out.parent}: no such folder for the archive")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT, dereference=True) as tar:
        _add_bytes(tar, MANIFEST, data)
        if sign_key is not None:
            _add_bytes(tar, SIGNATURE, sign(data, sign_key))
        for m in members:
            tar.add(m.source, arcname=m.name, recursive=False, filter=_plain)
    partial.replace(out)
    return manifest


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    entry = tarfile.TarInfo(name)
    entry.size, entry.mode = len(data), 0o644
    tar.addfile(entry, io.BytesIO(data))


def _plain(entry: tarfile.TarInfo) -> tarfile.TarInfo:
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = ""
    entry.mode = 0o755 if entry.mode & 0o111 else 0o644
    return entry


def sign(data: bytes, key: Path) -> bytes:
    _require_signing(key)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    private = load_pem_private_key(key.read_bytes(), password=None)
    if type(private).__name__ != "Ed25519PrivateKey":
        raise ArchiveError(f"{key}: not an ed25519 private key (openssl genpkey -algorithm ed25519 -out KEY)")
    return private.sign(data)


def _require_signing(path: Path) -> Path:
    try:
        import cryptography
    except ImportError:
        raise ArchiveError("signatures need the cryptography package: pip install cryptography (on Raspberry Pi "
                           "OS / Debian: apt install python3-cryptography)") from None
    if not path.is_file():
        raise ArchiveError(f"{path}: no such key file (cryptography {cryptography.__version__} is here)")
    return path


def verify_signature(data: bytes, signature: bytes | None, trusted: list[Path]) -> str:
    """The trusted public key file that signed data; ArchiveError when none did."""
    if signature is None:
        keys = ", ".join(map(str, trusted))
        raise ArchiveError(f"the archive is not signed, and trusted keys are configured ({keys})")
    for path in trusted:
        _require_signing(path)
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        public = load_pem_public_key(path.read_bytes())
        try:
            public.verify(signature, data)
            return str(path)
        except (InvalidSignature, TypeError, ValueError):
            continue
    raise ArchiveError(f"the archive's signature is not by a trusted key ({', '.join(map(str, trusted))})")


def read(archive: Path, dest: Path, trusted: list[Path] | None = None) -> dict:
    """Unpack archive into the new folder dest, checking everything; returns its manifest. Refuses, naming the
    member, anything unsafe (before dest exists) or not as the manifest says (dest is then removed): each member is
    hashed as it is written, so what was checked is what lands, even if the file changes under us."""
    try:
        return _read(archive, dest, trusted)
    except BaseException:
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        raise


def verify(archive: Path, trusted: list[Path] | None = None) -> dict:
    """Check everything read() checks, writing nothing; returns the manifest. `edge install` runs this before it
    touches the prefix, then read(), which checks again as it writes."""
    return _read(archive, None, trusted)


def _read(archive: Path, dest: Path | None, trusted: list[Path] | None) -> dict:
    try:
        with tarfile.open(archive, "r:") as tar:
            entries = tar.getmembers()
            manifest, data = _manifest(tar, entries)
            signature = _bytes(tar, entries, SIGNATURE) if any(e.name == SIGNATURE for e in entries) else None
            if trusted:
                verify_signature(data, signature, trusted)
            files = _check_entries(entries, manifest)
            _unpack_checked(tar, files, manifest, dest)
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError) and not archive.exists():
            raise ArchiveError(f"{archive}: no such archive") from None
        if isinstance(e, OSError) and dest is not None and dest.exists():
            raise ArchiveError(f"could not unpack into {dest}: {e}") from None
        raise ArchiveError(f"{archive}: unreadable or truncated archive ({e})") from None
    return manifest


def _manifest(tar: tarfile.TarFile, entries: list[tarfile.TarInfo]) -> tuple[dict, bytes]:
    if not entries or entries[0].name != MANIFEST:
        raise ArchiveError(f"not an edge pack: the first member is not {MANIFEST}")
    data = _bytes(tar, entries, MANIFEST)
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise ArchiveError(f"{MANIFEST}: not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("members"), dict):
        raise ArchiveError(f"{MANIFEST}: format {manifest.get('format') if isinstance(manifest, dict) else '?'} is "
                           f"not the format {FORMAT} this edge-llm reads")
    return manifest, data


def _bytes(tar: tarfile.TarFile, entries: list[tarfile.TarInfo], name: str) -> bytes:
    entry = next(e for e in entries if e.name == name)
    if not entry.isfile() or entry.size > CHUNK:
        raise ArchiveError(f"{name}: not a small regular file")
    return tar.extractfile(entry).read()


def _check_entries(entries: list[tarfile.TarInfo], manifest: dict) -> list[tarfile.TarInfo]:
    """The regular files to unpack; every entry safe, every file listed once, every listed file present."""
    files, seen, own = [], set(), {MANIFEST, SIGNATURE}
    for entry in entries:
        name = entry.name
        if name in own:  # the first manifest and signature, read already; a second one is an unlisted member
            own.discard(name)
            continue
        safe_name(name)
        if entry.isdir():
            continue
        if not entry.isfile():
            kind = "link" if entry.issym() or entry.islnk() else "device or special file"
            raise ArchiveError(f"member {name!r} is a {kind}: an edge pack holds regular files only")
        if name not in manifest["members"] or not isinstance(manifest["members"][name], dict):
            raise ArchiveError(f"member {name!r} is not in {MANIFEST}")
        if safe_name(name) in seen or name in seen:
            raise ArchiveError(f"member {name!r} appears twice")
        seen.update({name, safe_name(name)})
        files.append(entry)
    missing = sorted(n for n in manifest["members"] if n not in seen)
    if missing:
        raise ArchiveError(f"member {missing[0]!r} is listed in {MANIFEST} but missing from the archive")
    return files


def safe_name(name: str) -> str:
    """name as a path inside the target folder; ArchiveError for absolute paths, `..`, drive letters, backslashes."""
    parts = name.split("/")
    if any(ord(c) < 32 for c in name):
        raise ArchiveError(f"member {name!r} has control characters in its name")
    if name.startswith("/") or "\\" in name or ".." in parts or not name.strip("/.") or ":" in parts[0]:
        raise ArchiveError(f"member {name!r} points outside the archive's folder")
    return posixpath.normpath(name)


def _unpack_checked(tar: tarfile.TarFile, files: list[tarfile.TarInfo], manifest: dict, dest: Path | None) -> None:
    """Hash every member against the manifest, writing each into dest as it is hashed (dest None: hash only)."""
    if dest is not None:
        dest.mkdir(parents=True)
    for entry in files:
        path = _target_path(dest, entry.name) if dest is not None else None
        digest, size = hashlib.sha256(), 0
        with tar.extractfile(entry) as source, (open(path, "xb") if path else contextlib.nullcontext()) as target:
            for block in iter(lambda: source.read(CHUNK), b""):
                digest.update(block)
                size += len(block)
                if target is not None:
                    target.write(block)
        want = manifest["members"][entry.name]
        if size != want.get("size") or digest.hexdigest() != want.get("sha256"):
            raise ArchiveError(f"member {entry.name!r} does not match its checksum in {MANIFEST} (damaged or altered)")
        if path:
            path.chmod(0o755 if entry.mode & 0o111 else 0o644)  # never setuid/setgid, whatever the archive says


def _target_path(dest: Path, name: str) -> Path:
    path = (dest / safe_name(name)).resolve()
    if dest.resolve() not in path.parents:
        raise ArchiveError(f"member {name!r} points outside the archive's folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
