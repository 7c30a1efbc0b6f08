"""pcedge pack / unpack: one verified .tar.gz per bundle; nothing reaches the destination unverified."""

from __future__ import annotations

import argparse
import gzip
import io
import tarfile
from pathlib import Path

import pytest
from test_engines import write_tiny_bundle

from pcedge.commands import pack as cli_pack
from pcedge.commands import unpack as cli_unpack
from pcedge.runtime.tensorrt import engines
from pcedge.runtime.archive import ArchiveError, pack, unpack
from pcedge.runtime.bundle import BundleError, EngineSpec, open_bundle


@pytest.fixture
def bundle_with_engine(tmp_path) -> Path:
    """A tiny real bundle that also holds a recorded (fake-content) TensorRT plan."""
    root = write_tiny_bundle(tmp_path / "tiny.pcedge")
    rel = "engines/sm87-trt10.3-fp16.engine"  # any recorded plan file; its name is not parsed here
    (root / rel).parent.mkdir()
    (root / rel).write_bytes(b"plan built on an Orin")
    engines.record_engine(open_bundle(root), EngineSpec(file=rel, sm="sm87", trt_version="10.3.0", precision="fp16"))
    return root


def _members(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tar:
        return tar.getnames()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_round_trip_leaves_engines_out_by_default(bundle_with_engine, tmp_path):
    archive = pack(bundle_with_engine, tmp_path / "out" / "tiny.tar.gz")
    members = _members(archive)
    assert members[0] == "tiny.pcedge/manifest.json"  # first, so a reader meets the checksums before the data
    assert sorted(members[1:]) == ["tiny.pcedge/memory_bank.npy", "tiny.pcedge/model.onnx"]

    dest = unpack(archive, tmp_path / "device" / "tiny.pcedge")
    restored = open_bundle(dest)  # every checksum verified again
    assert restored.manifest.engines == [] and not any(rel.startswith("engines/") for rel in restored.manifest.files)
    for rel in ("model.onnx", "memory_bank.npy"):
        assert (dest / rel).read_bytes() == (bundle_with_engine / rel).read_bytes()
    assert not (dest / "engines").exists()
    assert _leftovers(tmp_path / "device") == [] and _leftovers(tmp_path / "out") == []


def test_include_engines_packs_the_plan_and_its_manifest_entry(bundle_with_engine, tmp_path):
    archive = pack(bundle_with_engine, tmp_path / "tiny.tar.gz", include_engines=True)
    assert "tiny.pcedge/engines/sm87-trt10.3-fp16.engine" in _members(archive)
    restored = open_bundle(unpack(archive, tmp_path / "copy.pcedge"))
    assert [e.file for e in restored.manifest.engines] == ["engines/sm87-trt10.3-fp16.engine"]
    assert (tmp_path / "copy.pcedge/engines/sm87-trt10.3-fp16.engine").read_bytes() == b"plan built on an Orin"


def test_real_exported_bundle_round_trips(fixture_bundle, tmp_path):
    archive = pack(fixture_bundle, tmp_path / "bsd.tar.gz")
    restored = open_bundle(unpack(archive, tmp_path / "bsd.pcedge"))
    original = open_bundle(fixture_bundle)
    assert restored.manifest.files == original.manifest.files
    assert restored.manifest.threshold == original.manifest.threshold


def test_pack_refuses_a_tampered_bundle(bundle_with_engine, tmp_path):
    with open(bundle_with_engine / "memory_bank.npy", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)[0]
        handle.seek(-1, 2)
        handle.write(bytes([last ^ 0xFF]))
    with pytest.raises(BundleError, match="memory_bank.npy"):
        pack(bundle_with_engine, tmp_path / "bad.tar.gz")
    assert not (tmp_path / "bad.tar.gz").exists() and _leftovers(tmp_path) == []


def test_a_tampered_byte_is_refused_naming_the_file_and_nothing_is_written(bundle_with_engine, tmp_path):
    archive = pack(bundle_with_engine, tmp_path / "tiny.tar.gz")
    raw = bytearray(gzip.decompress(archive.read_bytes()))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        member = tar.getmember("tiny.pcedge/model.onnx")
        raw[member.offset_data + member.size // 2] ^= 0x01  # one bit inside the file's data, headers intact
    tampered = tmp_path / "tampered.tar.gz"
    tampered.write_bytes(gzip.compress(bytes(raw)))

    dest = tmp_path / "device" / "tiny.pcedge"
    with pytest.raises(ArchiveError, match=r"model\.onnx does not match the sha256"):
        unpack(tampered, dest)
    assert not dest.exists() and _leftovers(tmp_path / "device") == []


def _archive_with(tmp_path: Path, *members: tarfile.TarInfo) -> Path:
    path = tmp_path / "crafted.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            data = b"x" * info.size
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _file(name: str, size: int = 4) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("member, reason", [
    (_file("tiny.pcedge/../../escaped.txt"), "climbs out"),
    (_file("/tmp/pcedge-absolute.txt"), "absolute path"),
    (_link("tiny.pcedge/model.onnx", "/etc/passwd"), "is a link"),
])
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, member, reason):
    archive = _archive_with(tmp_path, member, _file("tiny.pcedge/manifest.json"))
    dest = tmp_path / "device" / "tiny.pcedge"
    with pytest.raises(ArchiveError, match=reason) as caught:
        unpack(archive, dest)
    assert member.name in str(caught.value)
    assert not dest.exists() and _leftovers(tmp_path / "device") == []
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/pcedge-absolute.txt").exists()


def test_unlisted_member_is_refused(bundle_with_engine, tmp_path):
    archive = pack(bundle_with_engine, tmp_path / "tiny.tar.gz")
    with tarfile.open(archive, "r:gz") as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    extra = tmp_path / "extra.tar.gz"
    with tarfile.open(extra, "w:gz") as tar:
        for info, data in members + [(_file("tiny.pcedge/run_me.sh", 3), b"rm ")]:
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="run_me.sh' is not listed in the manifest"):
        unpack(extra, tmp_path / "dest.pcedge")
    assert not (tmp_path / "dest.pcedge").exists()


def test_existing_destination_needs_force(bundle_with_engine, tmp_path):
    archive = pack(bundle_with_engine, tmp_path / "tiny.tar.gz")
    dest = tmp_path / "deployed.pcedge"
    dest.mkdir()
    (dest / "old.txt").write_text("previous deployment")
    with pytest.raises(ArchiveError, match="already exists; pass --force"):
        unpack(archive, dest)
    # --force replaces only a pcedge bundle: a folder of anything else is kept (issue 11, item 5).
    with pytest.raises(ArchiveError, match="is not a pcedge bundle .*--force only replaces bundles: refused"):
        unpack(archive, dest, force=True)
    assert (dest / "old.txt").read_text() == "previous deployment"
    previous = unpack(archive, tmp_path / "previous.pcedge")
    (previous / "stale.txt").write_text("left by the previous deployment")
    unpack(archive, previous, force=True)
    assert not (previous / "stale.txt").exists() and open_bundle(previous).manifest.memory_bank.n == 10
    assert _leftovers(tmp_path) == []


def test_not_an_archive_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bundle.tar.gz"
    bogus.write_bytes(b"this is not gzip")
    with pytest.raises(ArchiveError, match="not a readable .tar.gz"):
        unpack(bogus, tmp_path / "dest.pcedge")
    assert _leftovers(tmp_path) == []


def _run(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_pack_and_unpack_commands_print_what_they_wrote_and_the_next_command(bundle_with_engine, tmp_path, capsys):
    archive = tmp_path / "tiny.tar.gz"
    assert _run(cli_pack, [str(bundle_with_engine), "-o", str(archive)]) == 0
    out = capsys.readouterr().out
    assert f"wrote       {archive}" in out and "without engines" in out
    assert "next: copy tiny.tar.gz to the device, then: pcedge unpack tiny.tar.gz tiny.pcedge" in out

    dest = tmp_path / "device.pcedge"
    assert _run(cli_unpack, [str(archive), str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"wrote       {dest}" in out and f"next: pcedge build-engine {dest}" in out

    assert _run(cli_unpack, [str(archive), str(dest)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
