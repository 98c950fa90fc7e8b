"""edge/archive.py: a pack is checked whole before anything is written; hostile and damaged archives are refused
with the member named; signatures are checked against trusted keys only."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from edge import archive
from edge.archive import ArchiveError, Member


@pytest.fixture
def good(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello" * 4000)  # 20 kB: past tar's 10 kB records, so a cut hits data
    (tmp_path / "src" / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "src" / "run.sh").chmod(0o755)
    members = [Member("bundle/a.txt", tmp_path / "src" / "a.txt"), Member("install.sh", tmp_path / "src" / "run.sh")]
    return archive.write(tmp_path / "good.tar", members, {"profile": "test"}), tmp_path / "good.tar"


def test_modes_are_plain_whatever_the_archive_says(tmp_path):
    payload = b"#!/bin/sh\n"
    setuid = entry("bin/tool")
    setuid.mode = 0o4777
    craft(tmp_path / "s.tar", [(setuid, payload)])
    archive.read(tmp_path / "s.tar", tmp_path / "out")
    assert (tmp_path / "out" / "bin" / "tool").stat().st_mode & 0o7777 == 0o755


def test_a_written_archive_reads_back(good, tmp_path):
    manifest, path = good
    assert set(manifest["members"]) == {"bundle/a.txt", "install.sh"}
    assert archive.read(path, tmp_path / "out") == manifest
    assert (tmp_path / "out" / "bundle" / "a.txt").read_text() == "hello" * 4000
    assert (tmp_path / "out" / "install.sh").stat().st_mode & 0o111  # still executable


def craft(path, entries: list[tuple[tarfile.TarInfo, bytes | None]], listed: dict | None = None) -> None:
    """An archive with a manifest listing `listed` (default: every regular file given) and the given entries."""
    files = {e.name: data for e, data in entries if e.isfile()}
    members = listed if listed is not None else {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                                                 for n, d in files.items()}
    with tarfile.open(path, "w") as tar:
        data = json.dumps({"format": 1, "members": members}).encode()
        head = tarfile.TarInfo(archive.MANIFEST)
        head.size = len(data)
        tar.addfile(head, io.BytesIO(data))
        for entry, payload in entries:
            if payload is not None:
                entry.size = len(payload)
            tar.addfile(entry, io.BytesIO(payload) if payload is not None else None)


def entry(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


@pytest.mark.parametrize("entries, listed, message", [
    ([(entry("../evil.txt"), b"x")], None, "member '../evil.txt' points outside"),
    ([(entry("./"), None)], {}, "member './' points outside"),
    ([(entry("bundle/a\x1b[2Jb"), b"x")], None, "control characters"),  # a terminal escape in a name
    ([(entry("bundle/a"), b"x"), (entry("./bundle/a"), b"x")], None, "member './bundle/a' (is not in|appears twice)"),
    ([(entry("bundle/../../evil.txt"), b"x")], None, "points outside"),
    ([(entry("/etc/evil"), b"x")], None, "member '/etc/evil' points outside"),
    ([(entry("bundle/link", tarfile.SYMTYPE, "/etc/passwd"), None)], {}, "member 'bundle/link' is a link"),
    ([(entry("bundle/hard", tarfile.LNKTYPE, "../../etc/passwd"), None)], {}, "member 'bundle/hard' is a link"),
    ([(entry("bundle/dev", tarfile.CHRTYPE), None)], {}, "member 'bundle/dev' is a device or special file"),
    ([(entry("bundle/fifo", tarfile.FIFOTYPE), None)], {}, "is a device or special file"),
    ([(entry("bundle/a.txt"), b"hello"), (entry("bundle/extra"), b"x")],
     {"bundle/a.txt": {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}},
     "member 'bundle/extra' is not in edge-pack.json"),
    ([(entry("bundle/a.txt"), b"hellO")], {"bundle/a.txt": {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}},
     "member 'bundle/a.txt' does not match its checksum"),
    ([], {"bundle/gone": {"size": 1, "sha256": "0" * 64}},
     "member 'bundle/gone' is listed in edge-pack.json but missing"),
])
def test_hostile_archives_are_refused_naming_the_member(tmp_path, entries, listed, message):
    craft(tmp_path / "bad.tar", entries, listed)
    with pytest.raises(ArchiveError, match=message):
        archive.read(tmp_path / "bad.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written, here or where a member pointed
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.parametrize("cut", [100, 1500, 8000, 17000])  # in the manifest's header, its data, a.txt's data
def test_a_truncated_archive_is_refused(good, tmp_path, cut):
    _, path = good
    (tmp_path / "cut.tar").write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ArchiveError):
        archive.read(tmp_path / "cut.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_pack(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ArchiveError, match="unreadable or truncated"):
        archive.read(tmp_path / "x.tar", tmp_path / "out")
    with pytest.raises(ArchiveError, match="no such archive"):
        archive.read(tmp_path / "missing.tar", tmp_path / "out")


def keypair(folder, name: str):
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    (folder / f"{name}.pem").write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    public = private.public_key()
    (folder / f"{name}.pub").write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return folder / f"{name}.pem", folder / f"{name}.pub"


def test_signatures_prove_origin(tmp_path):
    mine, my_public = keypair(tmp_path, "mine")
    _, their_public = keypair(tmp_path, "theirs")
    (tmp_path / "a.txt").write_text("hello")
    members = [Member("a.txt", tmp_path / "a.txt")]
    archive.write(tmp_path / "signed.tar", members, {}, sign_key=mine)
    archive.write(tmp_path / "unsigned.tar", members, {})
    assert archive.read(tmp_path / "signed.tar", tmp_path / "ok", trusted=[their_public, my_public])
    with pytest.raises(ArchiveError, match="not by a trusted key"):
        archive.read(tmp_path / "signed.tar", tmp_path / "no1", trusted=[their_public])
    with pytest.raises(ArchiveError, match="not signed"):
        archive.read(tmp_path / "unsigned.tar", tmp_path / "no2", trusted=[my_public])
    # the signed archive with a member swapped (the signed manifest kept), or with the manifest edited to match
    tamper(tmp_path / "signed.tar", tmp_path / "swapped.tar", lambda name, data: b"HELLO" if name == "a.txt" else data)
    with pytest.raises(ArchiveError, match="member 'a.txt' does not match its checksum"):
        archive.read(tmp_path / "swapped.tar", tmp_path / "no3", trusted=[my_public])
    edited = hashlib.sha256(b"hello").hexdigest(), hashlib.sha256(b"HELLO").hexdigest()
    tamper(tmp_path / "swapped.tar", tmp_path / "edited.tar",
           lambda name, data: data.replace(*(e.encode() for e in edited)) if name == archive.MANIFEST else data)
    with pytest.raises(ArchiveError, match="not by a trusted key"):
        archive.read(tmp_path / "edited.tar", tmp_path / "no4", trusted=[my_public])
    assert archive.read(tmp_path / "edited.tar", tmp_path / "unchecked")  # whole, but only a key says by whom
    assert not any((tmp_path / n).exists() for n in ("no1", "no2", "no3", "no4"))


def tamper(src, dst, change) -> None:
    with tarfile.open(src) as old, tarfile.open(dst, "w") as new:
        for member in old.getmembers():
            data = change(member.name, old.extractfile(member).read())
            member.size = len(data)
            new.addfile(member, io.BytesIO(data))
