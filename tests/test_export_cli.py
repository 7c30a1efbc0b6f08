"""`pcedge export` and `pcedge info` on real fixture images, including bad input."""

from __future__ import annotations

import shutil

import cv2
import pytest

from pcedge.cli import main
from pcedge.runtime.bundle import open_bundle

from conftest import BSD, PCB


@pytest.fixture()
def messy_folder(tmp_path):
    """A plain folder of good PCB images with a corrupt file, a text file and odd pixel formats."""
    folder = tmp_path / "good"
    folder.mkdir()
    sources = sorted((PCB / "train" / "good").iterdir())[:12]
    for src in sources[:9]:
        shutil.copy(src, folder / src.name)
    gray = cv2.imread(str(sources[9]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(folder / "gray.png"), gray)
    cv2.imwrite(str(folder / "deep16.png"), cv2.imread(str(sources[10])).astype("uint16") * 257)
    cv2.imwrite(str(folder / "alpha.png"), cv2.cvtColor(cv2.imread(str(sources[11])), cv2.COLOR_BGR2BGRA))
    (folder / "broken.png").write_bytes(sources[0].read_bytes()[:200])  # truncated PNG
    (folder / "notes.jpg").write_text("not an image")
    return folder


def test_export_skips_unreadable_files_and_converts_pixel_formats(messy_folder, tmp_path, capsys):
    out = tmp_path / "messy.pcedge"
    code = main(["export", "--data", str(messy_folder), "-o", str(out), "--quiet", "--threads", "2",
                 "--coreset", "0.05"])
    assert code == 0
    text = capsys.readouterr().out
    assert "skipped 2 unreadable file(s)" in text
    assert "broken.png" in text and "notes.jpg" in text
    m = open_bundle(out).manifest
    # 14 files: 2 unreadable -> all 12 others (gray/16-bit/alpha ones included) in the bank, and each one's
    # out-of-fold score in the threshold's calibration.
    assert m.memory_bank.n_train_images == 12 and m.threshold.n_images == 12 and m.threshold.folds == 5
    assert "expected false-alarm rate at most" in text
    assert "next: pcedge info" in text


def test_existing_output_needs_force_and_no_images_is_an_error(fixture_bundle, tmp_path, capsys):
    assert main(["export", "--data", str(BSD), "-o", str(fixture_bundle), "--quiet"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(6):
        (empty / f"{i}.png").write_text("junk")
    assert main(["export", "--data", str(empty), "-o", str(tmp_path / "e.pcedge"), "--quiet"]) == 2
    assert "no readable training image among 6 files" in capsys.readouterr().err
    assert not (tmp_path / "e.pcedge").exists()
    assert main(["export", "--data", str(tmp_path / "absent"), "-o", str(tmp_path / "f.pcedge"), "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_input_size_must_be_a_multiple_of_16(tmp_path, capsys):
    # Refused by the argument parser, before torch is even imported.
    with pytest.raises(SystemExit) as exc:
        main(["export", "--data", str(BSD), "-o", str(tmp_path / "x.pcedge"), "--size", "200", "--quiet"])
    assert exc.value.code == 2
    assert "argument --size" in (err := capsys.readouterr().err) and "multiple of 16" in err


def test_interrupted_export_leaves_no_bundle(monkeypatch, tmp_path):
    import pcedge.export.fit as fit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "calibrate_threshold", interrupted)
    out = tmp_path / "int.pcedge"
    with pytest.raises(KeyboardInterrupt):
        fit.export_bundle(fit.ExportConfig(data=BSD, output=out, progress=False, coreset=0.02))
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary directory


def test_info_prints_the_manifest(fixture_bundle, capsys):
    assert main(["info", str(fixture_bundle)]) == 0
    text = capsys.readouterr().out
    for needle in ("efficientnet_lite0", "memory bank", "coverage radius", "threshold", "ef_construction",
                   "max rel", "checksums   all verified", "next: pcedge verify"):
        assert needle in text
