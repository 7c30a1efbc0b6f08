"""Nothing pcedge writes destroys what it did not create (issue 11, items 5, 6, 7 and 18).

--force replaces only pcedge bundles; outputs never overlap the input data; unpack reads the manifest
first and refuses unlisted or oversized members before writing them; pack does not overwrite silently;
a target that appears while a bundle or archive is being written is kept.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from test_engines import write_tiny_bundle

from pcedge import cli
from pcedge.runtime import archive as archive_module
from pcedge.runtime.archive import ArchiveError, pack, unpack
from pcedge.runtime.bundle import BundleWriter, Manifest

ROOT = Path(__file__).resolve().parents[1]
GOOD = ROOT / "fixtures/ball_screw_drive/train/good"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A small copy of the fixture's good images in MVTec layout."""
    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    for path in sorted(GOOD.iterdir())[:3]:
        shutil.copy(path, good / path.name)
    return tmp_path / "data"


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_tiny_bundle(tmp_path / "tiny.pcedge")


# --------------------------------------------------------------------------------------------------
# Item 5: --force replaces only bundles; outputs never overlap the data
# --------------------------------------------------------------------------------------------------


def test_export_force_onto_its_own_data_is_refused_and_the_data_kept(dataset, capsys):
    before = sorted(p.name for p in (dataset / "train/good").iterdir())
    code, _, err = run_cli(["export", "--data", str(dataset), "-o", str(dataset), "--force"], capsys)
    assert code == 2
    assert f"{dataset}: exists and is not a pcedge bundle" in err and "--force only replaces bundles: refused" in err
    assert sorted(p.name for p in (dataset / "train/good").iterdir()) == before


def test_export_into_the_data_folder_is_refused(dataset, capsys):
    out = dataset / "train" / "part.pcedge"
    code, _, err = run_cli(["export", "--data", str(dataset), "-o", str(out)], capsys)
    assert code == 2 and f"{out}: the output overlaps the input data {dataset}" in err
    assert not out.exists() and _hidden(dataset / "train") == []


def test_export_force_onto_a_folder_of_documents_is_refused(dataset, tmp_path, capsys):
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(["export", "--data", str(dataset), "-o", str(docs), "--force"], capsys)
    assert code == 2 and "is not a pcedge bundle" in err
    assert (docs / "thesis.tex").read_text() == "years of work"


def test_unpack_force_onto_documents_or_a_file_is_refused(tiny, tmp_path, capsys):
    archive = pack(tiny, tmp_path / "tiny.tar.gz")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["unpack", str(archive), str(docs), "--force"], capsys)
    assert code == 2 and "is not a pcedge bundle" in err and (docs / "notes.txt").read_text() == "keep me"

    # Item 18: --force onto a regular file used to leave a hidden .NAME.old-PID behind.
    target = tmp_path / "report.txt"
    target.write_text("a file")
    code, _, err = run_cli(["unpack", str(archive), str(target), "--force"], capsys)
    assert code == 2 and "is not a pcedge bundle" in err and target.read_text() == "a file"
    assert _hidden(tmp_path) == []


def test_bundle_writer_force_replaces_a_bundle_but_not_anything_else(tmp_path):
    target = tmp_path / "x.pcedge"
    target.mkdir()
    (target / "data.csv").write_text("1,2,3")
    with pytest.raises(FileExistsError, match="is not a pcedge bundle"):
        BundleWriter(target, force=True)
    assert (target / "data.csv").exists() and _hidden(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Item 6: unpack checks before it writes
# --------------------------------------------------------------------------------------------------


def _members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive, "r:gz") as tar:
        return [(info, tar.extractfile(info).read()) for info in tar.getmembers()]


def _write_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unlisted_huge_member_is_refused_before_a_byte_of_it_is_written(tiny, tmp_path):
    # The case: a big zero-filled member not listed in the manifest. The child process may write at
    # most 8 MiB per file (RLIMIT_FSIZE): writing the member before checking it would fail differently.
    members = _members(pack(tiny, tmp_path / "tiny.tar.gz"))
    crafted = tmp_path / "crafted.tar.gz"
    with tarfile.open(crafted, "w:gz", compresslevel=1) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
        big = tarfile.TarInfo("tiny.pcedge/zeros.bin")
        big.size = 64 << 20
        tar.addfile(big, io.BytesIO(bytes(big.size)))
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # exceeding the limit is then an EFBIG error, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
        from pcedge.runtime.archive import ArchiveError, unpack
        try:
            unpack({str(crafted)!r}, {str(tmp_path / 'dest.pcedge')!r})
        except ArchiveError as exc:
            print(exc)
            sys.exit(2)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "member 'tiny.pcedge/zeros.bin' is not listed in the manifest; refused" in result.stdout
    assert not (tmp_path / "dest.pcedge").exists() and _hidden(tmp_path) == []


def test_member_larger_than_listed_and_too_little_disk_space_are_refused(tiny, tmp_path):
    members = _members(pack(tiny, tmp_path / "tiny.tar.gz"))
    manifest_info, manifest_bytes = members[0]

    grown = [(i, d + b"\0" * 1000 if i.name.endswith("model.onnx") else d) for i, d in members]
    with pytest.raises(ArchiveError, match=r"model.onnx' is \d+ bytes, the manifest lists \d+; refused"):
        unpack(_write_archive(tmp_path / "grown.tar.gz", grown), tmp_path / "a.pcedge")

    manifest = json.loads(manifest_bytes)
    manifest["files"]["model.onnx"]["size"] = 10**15  # a petabyte
    huge = [(manifest_info, json.dumps(manifest).encode())] + members[1:]
    with pytest.raises(ArchiveError, match=r"unpacking needs 1000000000\.\d MB, only [\d.]+ MB free on .*; nothing written"):
        unpack(_write_archive(tmp_path / "huge.tar.gz", huge), tmp_path / "b.pcedge")
    assert _hidden(tmp_path) == []


def test_manifest_must_come_first(tiny, tmp_path):
    members = _members(pack(tiny, tmp_path / "tiny.tar.gz"))
    with pytest.raises(ArchiveError, match=r"the first file is 'tiny.pcedge/(model.onnx|memory_bank.npy)', not tiny.pcedge/manifest.json"):
        unpack(_write_archive(tmp_path / "late.tar.gz", members[1:] + members[:1]), tmp_path / "c.pcedge")


# --------------------------------------------------------------------------------------------------
# Item 7: pack does not overwrite silently; a target that appears meanwhile is kept
# --------------------------------------------------------------------------------------------------


def test_pack_needs_force_to_replace_a_file_and_never_replaces_other_kinds(tiny, tmp_path, capsys):
    out = tmp_path / "tiny.tar.gz"
    out.write_text("an older archive, or something else")
    code, _, err = run_cli(["pack", str(tiny), "-o", str(out)], capsys)
    assert code == 2 and f"{out}: already exists; pass --force to replace it" in err
    assert out.read_text() == "an older archive, or something else"
    code, _, _ = run_cli(["pack", str(tiny), "-o", str(out), "--force"], capsys)
    assert code == 0 and tarfile.is_tarfile(out)

    folder = tmp_path / "folder.tar.gz"
    folder.mkdir()
    code, _, err = run_cli(["pack", str(tiny), "-o", str(folder), "--force"], capsys)
    assert code == 2 and f"{folder} is a folder; refused: give a file name" in err and folder.is_dir()
    # A symlink is followed, as a shell's `>` does: the file it points to needs --force like any file, is
    # replaced with it, and the link stays a link.
    link = tmp_path / "link.tar.gz"
    link.symlink_to(out)
    out.write_text("an older archive again")
    code, _, err = run_cli(["pack", str(tiny), "-o", str(link)], capsys)
    assert code == 2 and "already exists; pass --force to replace it" in err and out.read_text() == "an older archive again"
    code, _, _ = run_cli(["pack", str(tiny), "-o", str(link), "--force"], capsys)
    assert code == 0 and link.is_symlink() and tarfile.is_tarfile(out)
    assert _hidden(tmp_path) == []


def test_pack_keeps_an_archive_that_appeared_while_packing(tiny, tmp_path, monkeypatch):
    out = tmp_path / "tiny.tar.gz"
    real = archive_module._tarinfo

    def another_run_finishes_first(*args, **kwargs):
        if not out.exists():
            out.write_bytes(b"the other run's archive")
        return real(*args, **kwargs)

    monkeypatch.setattr(archive_module, "_tarinfo", another_run_finishes_first)
    with pytest.raises(ArchiveError, match="appeared while packing .*it was kept, nothing written"):
        pack(tiny, out)
    assert out.read_bytes() == b"the other run's archive" and _hidden(tmp_path) == []


def test_concurrent_export_second_commit_fails_instead_of_replacing_the_first(tmp_path):
    target = tmp_path / "part.pcedge"
    first = BundleWriter(target)
    second = BundleWriter(target)  # both started while nothing was there
    for writer, content in ((first, b"first"), (second, b"second")):
        writer.path("model.onnx").write_bytes(content)
        writer.path("memory_bank.npy").write_bytes(content)
    first.commit(Manifest())
    with pytest.raises(FileExistsError, match="appeared while this bundle was being written .*it was kept and nothing was written"):
        with second:
            second.commit(Manifest())
    assert (target / "model.onnx").read_bytes() == b"first" and _hidden(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Item 18: unpack's odd destinations and member names
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dest", [".", "", ".."])
def test_unpack_to_dot_or_empty_is_refused(tiny, tmp_path, capsys, monkeypatch, dest):
    archive = pack(tiny, tmp_path / "tiny.tar.gz")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    code, _, err = run_cli(["unpack", str(archive), dest], capsys)
    assert code == 2 and "name the bundle directory to create, e.g. part.pcedge" in err
    code, _, err = run_cli(["unpack", str(archive), dest, "--force"], capsys)
    assert code == 2 and (work / "keep.txt").exists() and _hidden(work) == [] and _hidden(tmp_path) == []


def test_member_below_a_file_is_refused_with_a_message(tiny, tmp_path, capsys):
    members = _members(pack(tiny, tmp_path / "tiny.tar.gz"))
    nested = tarfile.TarInfo("tiny.pcedge/manifest.json/x")
    crafted = _write_archive(tmp_path / "nested.tar.gz", members + [(nested, b"boo")])
    code, _, err = run_cli(["unpack", str(crafted), str(tmp_path / "d.pcedge")], capsys)
    assert code == 2 and "Errno" not in err
    assert "member 'tiny.pcedge/manifest.json/x' is not listed in the manifest; refused" in err
