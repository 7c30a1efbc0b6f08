"""Issue 11, part B: bad inputs, outputs and careless commands never crash, lie or destroy data.

One section per numbered item of the issue (4, 8, 9, 11, 12, 14, 15, 16, 17, 19, 20, 21). Everything runs on
the real fixture bundle, real images, real ONNX Runtime sessions; commands that must be killed, must lose
their privileges or must write into a closed pipe run as real subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pcedge.cli import main
from pcedge.runtime.bundle import MEMORY_BANK_FILE, BundleWriter, file_entry, read_manifest

from conftest import BSD, ROOT

GOOD = sorted((BSD / "test" / "good").iterdir())
PITTING = sorted((BSD / "test" / "pitting").iterdir())


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as strict parsers (JavaScript, Go, jq) do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def cli(*args: str, timeout: float = 300, unprivileged: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``pcedge ARGS`` in a fresh interpreter. ``unprivileged``: without the capabilities that let root read
    any file (so that a chmod 000 file is really unreadable, as it is for a normal user)."""
    command = [sys.executable, "-m", "pcedge.cli", *args]
    if unprivileged and os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *command]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def nan_tiff(path: Path) -> Path:
    """A float32 TIFF (a real file, decoded by OpenCV) from a fixture image, with a NaN patch."""
    image = cv2.imread(str(GOOD[0]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    image[10:30, 10:30] = np.nan
    assert cv2.imwrite(str(path), image)
    assert np.isnan(cv2.imread(str(path), cv2.IMREAD_UNCHANGED)).any()
    return path


# ============================================================================ 4. outputs that are not files
def _read_fifo(path: Path, sink: list[bytes]) -> threading.Thread:
    def read():
        with open(path, "rb") as handle:
            sink.append(handle.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_open_output_writes_in_place_to_a_fifo_and_a_device_and_follows_symlinks(tmp_path):
    from pcedge.runtime.files import OutputError, check_output, open_output, write_json

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = _read_fifo(fifo, got)
    with open_output(fifo, "wb") as handle:
        handle.write(b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)

    target = tmp_path / "real.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, {"a": float("nan"), "b": 1})
    assert link.is_symlink() and strict_json(target.read_text()) == {"a": None, "b": 1}
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # the replaced file keeps its permissions
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "made-by-us.json")
    write_json(dangling, [1])
    assert dangling.is_symlink() and json.loads((tmp_path / "made-by-us.json").read_text()) == [1]

    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output(folder)
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(OutputError, match="loop.json"):
        check_output(loop)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporaries left behind


def test_open_output_keeps_a_character_device(tmp_path):
    from pcedge.runtime.files import write_json

    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the same device as /dev/null
    except PermissionError:
        pytest.skip("no CAP_MKNOD here; the FIFO case of the same code path is tested above")
    try:
        write_json(node, {"x": 1})
    except PermissionError:
        pytest.skip("device nodes are not usable on this file system (nodev)")
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_pack_predict_eval_bench_never_replace_a_fifo_or_a_symlink(fixture_bundle, tmp_path):
    # pack -o FIFO: the archive streams through the pipe and the pipe is still a pipe.
    fifo = tmp_path / "archive.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = _read_fifo(fifo, got)
    assert main(["pack", str(fixture_bundle), "-o", str(fifo)]) == 0
    reader.join(30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and got and got[0][:2] == b"\x1f\x8b"  # gzip
    (tmp_path / "copy.tar.gz").write_bytes(got[0])
    assert main(["unpack", str(tmp_path / "copy.tar.gz"), str(tmp_path / "copy.pcedge")]) == 0

    # predict --jsonl into a FIFO read by another program (`pcedge predict ... --jsonl >(jq ...)`).
    fifo2 = tmp_path / "lines.fifo"
    os.mkfifo(fifo2)
    got2: list[bytes] = []
    reader = _read_fifo(fifo2, got2)
    assert main(["predict", str(fixture_bundle), str(GOOD[0]), "--jsonl", str(fifo2), "--backend", "ort-cpu"]) == 0
    reader.join(30)
    assert stat.S_ISFIFO(os.lstat(fifo2).st_mode) and strict_json(got2[0].decode())["path"] == str(GOOD[0])

    # eval --json through a symlink: the file it points to is written, the link stays a link.
    report = tmp_path / "reports" / "eval.json"
    report.parent.mkdir()
    report.write_text("{}")
    link = tmp_path / "latest.json"
    link.symlink_to(report)
    assert main(["eval", str(fixture_bundle), "--data", str(BSD), "--json", str(link), "--backend", "ort-cpu",
                 "--quiet"]) == 0
    assert link.is_symlink() and "metrics" in strict_json(report.read_text())

    # bench --md into a FIFO, --json into a directory (refused before any timing).
    assert main(["bench", str(fixture_bundle), "--json", str(tmp_path), "--no-peak"]) == 2
    fifo3 = tmp_path / "md.fifo"
    os.mkfifo(fifo3)
    got3: list[bytes] = []
    reader = _read_fifo(fifo3, got3)
    assert main(["bench", str(fixture_bundle), "--md", str(fifo3), "--backend", "ort-cpu", "--index", "exact",
                 "--batch", "1", "--repeats", "1", "--warmup", "0", "--no-peak"]) == 0
    reader.join(30)
    assert stat.S_ISFIFO(os.lstat(fifo3).st_mode) and b"|" in got3[0]


# ============================================================================ 8. non-finite input
def test_nan_image_is_an_error_for_that_image_and_jsonl_stays_strict(fixture_bundle, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = nan_tiff(folder / "nan_patch.tiff")
    shutil.copy(GOOD[0], folder / "good.jpg")
    jsonl = tmp_path / "out.jsonl"
    assert main(["predict", str(fixture_bundle), str(folder), "--jsonl", str(jsonl), "--backend", "ort-cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: " in err and "non-finite" in err
    records = [strict_json(line) for line in jsonl.read_text().splitlines()]
    assert [("error" in r) for r in records] == [False, True]  # good.jpg scored, nan_patch.tiff refused
    assert records[0]["verdict"] in ("good", "anomalous") and math.isfinite(records[0]["score"])
    assert "non-finite" in records[1]["error"] and records[1]["path"] == str(bad)

    from pcedge.runtime.detector import Detector
    from pcedge.runtime.preprocess import ImageError

    array = cv2.imread(str(GOOD[0]), cv2.IMREAD_UNCHANGED).astype(np.float32) / 255.0
    array[0, 0] = np.inf
    with Detector.open(fixture_bundle, backend="ort-cpu") as detector, pytest.raises(ImageError, match="non-finite"):
        detector(array)


def test_watch_skips_a_nan_frame_and_accounts_for_every_frame(fixture_bundle, tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(GOOD[0], folder / "a.jpg")
    nan_tiff(folder / "b.tiff")
    shutil.copy(GOOD[1], folder / "c.jpg")
    jsonl = tmp_path / "watch.jsonl"
    assert main(["watch", str(fixture_bundle), str(folder), "--jsonl", str(jsonl), "--backend", "ort-cpu"]) == 0
    events = [strict_json(line) for line in jsonl.read_text().splitlines()]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["error"] is None
    assert (summary["frames"], summary["processed"], summary["skipped"], summary["dropped"]) == (3, 2, 1, 0)
    skipped = [e for e in events if e["event"] == "skipped"]
    assert len(skipped) == 1 and "b.tiff" in skipped[0]["reason"] and "non-finite" in skipped[0]["reason"]


def test_watch_pipeline_skips_a_nan_array_from_a_custom_source(fixture_bundle):
    """A frame source of the integrator's own (arrays, no file) reaches the backbone stage unchecked."""
    from pcedge.runtime.detector import Detector
    from pcedge.runtime.watch.pipeline import WatchOptions, WatchPipeline
    from pcedge.runtime.watch.sources import Frame, SourceStats

    good = cv2.imread(str(GOOD[0]), cv2.IMREAD_UNCHANGED).astype(np.float32) / 255.0
    bad = good.copy()
    bad[5, 5] = np.nan

    class ArraySource:
        spec, is_live, nominal_fps, on_event = "arrays", False, None, None

        def __init__(self):
            self.stats, self.frames = SourceStats(), [good, bad, good]

        def read(self):
            if not self.frames:
                return None
            n = 3 - len(self.frames)
            return Frame(image=self.frames.pop(0), number=n, timestamp_ms=float(n), origin=f"array {n}")

        def stop(self):
            self.frames = []

        def release(self):
            pass

    with Detector.open(fixture_bundle, backend="ort-cpu") as detector:
        summary = WatchPipeline(detector, ArraySource(), WatchOptions(handle_signals=False)).run()
    assert summary.error is None and (summary.processed, summary.skipped, summary.frames) == (2, 1, 3)
    assert summary.accounted


def test_eval_and_export_name_a_nan_file(fixture_bundle, tmp_path, capsys):
    category = tmp_path / "cat"
    shutil.copytree(BSD, category)
    bad = nan_tiff(category / "test" / "good" / "zz_nan.tiff")
    assert main(["eval", str(fixture_bundle), "--data", str(category), "--backend", "ort-cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "non-finite" in err and "Traceback" not in err

    from pcedge.export.fit import ExportConfig, export_bundle

    train = tmp_path / "train"
    train.mkdir()
    for path in sorted((BSD / "train" / "good").iterdir())[:12]:
        shutil.copy(path, train / path.name)
    nan_tiff(train / "nan.tiff")
    report = export_bundle(ExportConfig(data=train, output=tmp_path / "n.pcedge", progress=False, threads=2,
                                        geometry=_small(), coreset=0.1))
    assert any("nan.tiff" in s and "non-finite" in s for s in report.skipped)


def _small():
    from pcedge.runtime.bundle import Geometry

    return Geometry(height=112, width=112)


# ============================================================================ 9. degenerate bundles
def test_settings_that_score_everything_zero_are_refused(tmp_path, capsys):
    for flags, words in ((["--coreset", "1"], ("argument --coreset", "at least 2")),
                         (["--b", "1"], ("argument --b", "at least 2"))):
        with pytest.raises(SystemExit) as exc:
            main(["export", "--data", str(BSD), "-o", str(tmp_path / "x.pcedge"), *flags])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err

    # A count between 2 and b, and a ratio that rounds to too few rows: refused before any image is read.
    t = time.perf_counter()
    assert main(["export", "--data", str(BSD), "-o", str(tmp_path / "y.pcedge"), "--coreset", "5", "--quiet"]) == 2
    assert "--coreset 5 keeps 5 memory feature(s)" in (err := capsys.readouterr().err) and "at least 9" in err
    assert main(["export", "--data", str(BSD), "-o", str(tmp_path / "z.pcedge"), "--coreset", "0.0001",
                 "--quiet"]) == 2
    assert "--coreset 0.0001 keeps 2 memory feature(s)" in capsys.readouterr().err
    assert time.perf_counter() - t < 60 and not (tmp_path / "z.pcedge").exists()


def test_export_refuses_all_zero_nominal_scores_and_a_bad_threshold():
    from pcedge.export.fit import check_nominal_scores

    with pytest.raises(ValueError, match="all 3 held-out good images .* score 0"):
        check_nominal_scores(np.zeros(3), "held-out fraction 0.1")
    with pytest.raises(ValueError, match="non-finite"):
        check_nominal_scores(np.array([0.5, np.nan]), "val dir v")
    check_nominal_scores(np.array([0.0, 0.2]), "val dir v")  # one non-zero score is a usable spread


def _degenerate_copy(bundle: Path, out: Path) -> Path:
    """The bundle `--coreset 1` used to write: a one-row memory bank, its index and reference scores (all 0),
    with checksums that match, exactly as the old exporter produced it."""
    from pcedge.runtime.index import ExactIndex, HnswIndex
    from pcedge.runtime.scoring import Scorer

    shutil.copytree(bundle, out)
    manifest = read_manifest(out)
    bank = np.load(out / MEMORY_BANK_FILE)[:1].copy()
    np.save(out / MEMORY_BANK_FILE, bank)
    HnswIndex.build(bank, M=manifest.index.M, ef_construction=manifest.index.ef_construction,
                    seed=manifest.index.seed).save(out / manifest.index.file)
    exact = ExactIndex(bank)
    scorer = Scorer(bank, exact, exact, manifest.scoring)
    emb = np.load(out / manifest.check.embeddings)
    scores = np.array([scorer.image_score(emb[b], p).score for b, p in enumerate(scorer.patch_scores(emb))],
                      dtype=np.float32)
    assert not scores.any()  # Eq. 7 with b clipped to one row: every weight is 0
    np.save(out / manifest.check.scores, scores)
    manifest.memory_bank.n = 1
    for rel in (MEMORY_BANK_FILE, manifest.index.file, manifest.check.scores):
        manifest.files[rel] = file_entry(out, rel)
    (out / "manifest.json").write_text(manifest.to_json())
    return out


def test_verify_fails_a_degenerate_bundle(fixture_bundle, tmp_path, capsys):
    # The manifest schema refuses a one-row bank with Eq. 7's b = 9 on open, naming the field, before any check runs.
    degenerate = _degenerate_copy(fixture_bundle, tmp_path / "one-row.pcedge")
    assert main(["verify", str(degenerate), "--backend", "ort-cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  checksums" in out and "scoring.reweight_b: must be in 1..1" in out

    zero = tmp_path / "zero-threshold.pcedge"
    shutil.copytree(fixture_bundle, zero)
    manifest = read_manifest(zero)
    manifest.threshold.value = 0.0
    (zero / "manifest.json").write_text(manifest.to_json())
    assert main(["verify", str(zero), "--backend", "ort-cpu"]) == 1
    assert "threshold.value: must be a positive finite number" in capsys.readouterr().out


def test_verify_checks_behind_the_schema_fail_degenerate_values():
    # What verify says when a threshold or reference scores slip past the manifest (e.g. scores all 0 from an
    # older exporter whose bank and b were individually valid).
    from pcedge.runtime.bundle import ScoringSpec
    from pcedge.runtime.verification import _spread_check, _threshold_check

    assert not _threshold_check(0.0).passed and not _threshold_check(float("nan")).passed
    assert _threshold_check(0.25).passed
    spread = _spread_check(np.zeros(3, dtype=np.float32), 1, ScoringSpec())
    assert not spread.passed and "reference images score 0" in spread.detail and "1 row(s)" in spread.detail
    assert _spread_check(np.array([0.1, 0.4], dtype=np.float32), 212, ScoringSpec()).passed


# ============================================================================ 11. non-binary masks
def test_jpeg_masks_are_thresholded_at_half_their_maximum_with_a_warning(tmp_path, caplog):
    from pcedge.runtime.evaluation.dataset import read_mask

    mask_png = sorted((BSD / "ground_truth" / "pitting").iterdir())[0]
    binary = cv2.imread(str(mask_png), cv2.IMREAD_GRAYSCALE)
    truth = binary > 0
    jpeg = tmp_path / "mask.jpg"
    cv2.imwrite(str(jpeg), binary, [cv2.IMWRITE_JPEG_QUALITY, 50])
    decoded = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    assert (decoded > 0).sum() > truth.sum() * 1.05  # "non-zero = defect" grows the defect by the JPEG halo
    with caplog.at_level("WARNING", logger="pcedge.eval"):
        mask = read_mask(jpeg, truth.shape)
    assert "mask.jpg" in caplog.text and "not binary" in caplog.text and "half its maximum" in caplog.text
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    caplog.clear()
    with caplog.at_level("WARNING", logger="pcedge.eval"):
        assert np.array_equal(read_mask(mask_png, truth.shape), truth)  # a binary mask: no warning, non-zero rule
    assert caplog.text == ""
    ones = tmp_path / "ones.png"
    cv2.imwrite(str(ones), truth.astype(np.uint8))  # 0/1 masks are binary too
    assert np.array_equal(read_mask(ones, truth.shape), truth)


# ============================================================================ 12. unreadable files
def test_unreadable_files_are_reported_like_bad_images(fixture_bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    locked = folder / "locked.jpg"
    shutil.copy(GOOD[0], locked)
    locked.chmod(0)
    shutil.copy(GOOD[1], folder / "open.jpg")
    jsonl = tmp_path / "p.jsonl"
    done = cli("predict", str(fixture_bundle), str(folder), "--jsonl", str(jsonl), "--backend", "ort-cpu",
               unprivileged=True)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and f"{locked}: cannot be read (Permission denied)" in done.stderr
    assert "summary: 1 scored" in done.stdout and "1 failed" in done.stdout

    frames = cli("watch", str(fixture_bundle), str(folder), "--backend", "ort-cpu", unprivileged=True)
    assert frames.returncode == 0 and "Traceback" not in frames.stderr, frames.stderr
    assert "1 skipped" in frames.stdout or "skipped 1" in frames.stdout, frames.stdout

    category = tmp_path / "cat"
    shutil.copytree(BSD, category)
    bad = sorted((category / "test" / "pitting").iterdir())[0]
    bad.chmod(0)
    done = cli("eval", str(fixture_bundle), "--data", str(category), "--backend", "ort-cpu", "--quiet",
               unprivileged=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{bad}: cannot be read (Permission denied)" in done.stderr

    train = tmp_path / "train"
    train.mkdir()
    for path in sorted((BSD / "train" / "good").iterdir())[:10]:
        shutil.copy(path, train / path.name)
    first = sorted(train.iterdir())[0]
    first.chmod(0)
    done = cli("export", "--data", str(train), "-o", str(tmp_path / "e.pcedge"), "--size", "112", "--coreset", "0.1",
               "--threads", "2", "--quiet", unprivileged=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "skipped 1 unreadable file(s)" in done.stdout and f"{first}: cannot be read" in done.stdout


def test_unreadable_sub_folders_are_reported_not_skipped(fixture_bundle, tmp_path):
    folder = tmp_path / "in"
    locked = folder / "line2"
    locked.mkdir(parents=True)
    shutil.copy(GOOD[0], locked / "hidden.jpg")
    shutil.copy(GOOD[1], folder / "open.jpg")
    locked.chmod(0)
    try:
        jsonl = tmp_path / "p.jsonl"
        done = cli("predict", str(fixture_bundle), str(folder), "--jsonl", str(jsonl), "--backend", "ort-cpu",
                   unprivileged=True)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{locked}: folder cannot be listed (Permission denied); its images were not read" in done.stderr
    assert "summary: 1 scored" in done.stdout and "1 failed" in done.stdout
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(folder / "open.jpg"), str(locked)] and "error" in records[1]


# ============================================================================ 14. flags checked up front
BAD_FLAGS = [
    (["export", "--data", "D", "-o", "O", "--M", "0"], "--M"),
    (["export", "--data", "D", "-o", "O", "--M", "1"], "--M"),
    (["export", "--data", "D", "-o", "O", "--coreset", "inf"], "--coreset"),
    (["export", "--data", "D", "-o", "O", "--coreset", "nan"], "--coreset"),
    (["export", "--data", "D", "-o", "O", "--threads", "-1"], "--threads"),
    (["export", "--data", "D", "-o", "O", "--batch", "0"], "--batch"),
    (["export", "--data", "D", "-o", "O", "--fpr", "1e-300"], "--fpr"),
    (["export", "--data", "D", "-o", "O", "--fpr", "nan"], "--fpr"),
    (["export", "--data", "D", "-o", "O", "--b", "0"], "--b"),
    (["export", "--data", "D", "-o", "O", "--ef", "0"], "--ef"),
    (["export", "--data", "D", "-o", "O", "--val-fraction", "1.5"], "--val-fraction"),
    (["export", "--data", "D", "-o", "O", "--dim", "0"], "--dim"),
    (["predict", "B", "I", "--threads", "-1"], "--threads"),
    (["predict", "B", "I", "--batch", "0"], "--batch"),
    (["predict", "B", "I", "--batch", "-1"], "--batch"),
    (["predict", "B", "I", "--ef", "0"], "--ef"),
    (["predict", "B", "I", "--ef", "-5"], "--ef"),
    (["predict", "B", "I", "--threshold", "nan"], "--threshold"),
    (["eval", "B", "--data", "D", "--batch", "0"], "--batch"),
    (["eval", "B", "--data", "D", "--pixel-size", "-1"], "--pixel-size"),
    (["verify", "B", "--ef", "-5"], "--ef"),
    (["bench", "B", "--threads", "0"], "--threads"),
    (["bench", "B", "--ef", "0"], "--ef"),
    (["watch", "B", "S", "--fps", "nan"], "--fps"),
    (["watch", "B", "S", "--fps", "inf"], "--fps"),
    (["watch", "B", "S", "--fps", "0"], "--fps"),
    (["watch", "B", "S", "--duration", "nan"], "--duration"),
    (["watch", "B", "S", "--save-every-s", "nan"], "--save-every-s"),
    (["watch", "B", "S", "--save-every-s", "-1"], "--save-every-s"),
    (["watch", "B", "S", "--max-frames", "0"], "--max-frames"),
    (["build-engine", "B", "--max-batch", "0"], "--max-batch"),
]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_every_numeric_flag_is_checked_before_any_work(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err


def test_a_camera_index_out_of_range_is_refused_by_name(tmp_path, capsys):
    t = time.perf_counter()
    assert main(["watch", str(tmp_path / "no-bundle-needed.pcedge"), str(2**31)]) == 2
    err = capsys.readouterr().err
    assert "camera index 2147483648 is out of range" in err and time.perf_counter() - t < 5


# ============================================================================ 15. export memory bound
def test_export_refuses_a_job_larger_than_the_machine_without_allocating_it(tmp_path):
    from pcedge.export.memory import estimate_export_memory

    # The child below runs under an address-space limit (ulimit -v): that is the machine it has, whatever
    # this one has, and had the refusal not come first it would die of MemoryError instead of running this
    # machine out of memory.
    limit = 12 * 1024**3
    estimate = estimate_export_memory(27, (1000, 1000), 152, (8000, 8000), 8, "efficientnet_lite0", 128, n_val=3)
    assert estimate.total_bytes > 10 * limit

    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t = time.perf_counter()
    done = cli("export", "--data", str(BSD), "-o", str(tmp_path / "huge.pcedge"), "--size", "8000", "--quiet",
               preexec_fn=cap)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("pcedge export: this export needs about ") and " GB of memory but " in err
    assert "--size" in err and "--batch" in err and "memory bank 30 images x 1000000 patches x D=152" in err  # every training image: out-of-fold calibration
    assert time.perf_counter() - t < 120 and not (tmp_path / "huge.pcedge").exists()


def test_memory_estimate_of_the_default_export_is_modest():
    from pcedge.export.memory import estimate_export_memory

    e = estimate_export_memory(27, (28, 28), 152, (224, 224), 8, "efficientnet_lite0", 128)
    assert e.bank_bytes == 27 * 784 * 152 * 4
    assert e.total_bytes < 1e9 and e.fits  # the fixture export must never be refused


# ============================================================================ 16. unwritable outputs
def test_unwritable_outputs_are_refused_before_any_work(fixture_bundle, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    under_file = blocker / "sub" / "out.jsonl"
    cases = [
        (["predict", str(fixture_bundle), str(GOOD[0]), "--jsonl", str(under_file)], "--jsonl"),
        (["predict", str(fixture_bundle), str(GOOD[0]), "--save-maps", str(blocker)], "--save-maps"),
        (["predict", str(fixture_bundle), str(GOOD[0]), "--jsonl", "/proc/pcedge-test.jsonl"], "--jsonl"),
        (["eval", str(fixture_bundle), "--data", str(BSD), "--json", str(under_file)], "--json"),
        (["bench", str(fixture_bundle), "--md", str(under_file), "--no-peak"], "--md"),
        (["watch", str(fixture_bundle), str(BSD / "test" / "good"), "--jsonl", str(under_file)], "--jsonl"),
        (["watch", str(fixture_bundle), str(BSD / "test" / "good"), "--save-dir", str(blocker)], "--save-dir"),
        (["watch", str(fixture_bundle), str(BSD / "test" / "good"), "--video-out", str(blocker / "v.mp4")],
         "--video-out"),
    ]
    for argv, flag in cases:
        t = time.perf_counter()
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        assert f"pcedge {argv[0]}: {flag} " in out.err and "Traceback" not in out.err, out.err
        assert "summary" not in out.out and "pcedge predict: 1 image" not in out.err  # nothing was scored
        assert time.perf_counter() - t < 20


# ============================================================================ 17. closed pipes
@pytest.mark.parametrize("command", ["info", "predict", "pack"])
def test_a_closed_pipe_ends_the_command_quietly(fixture_bundle, tmp_path, command):
    args = {"info": ["info", str(fixture_bundle)],
            "predict": ["predict", str(fixture_bundle), str(GOOD[0]), "--backend", "ort-cpu"],
            "pack": ["pack", str(fixture_bundle), "-o", str(tmp_path / "b.tar.gz")]}[command]
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` that has already exited: every write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "pcedge.cli", *args], cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141


# ============================================================================ 19. SIGTERM and stale partials
def test_sigterm_during_predict_flushes_what_was_scored(fixture_bundle, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):  # copies, not links: each is its own input
        shutil.copy(GOOD[i % len(GOOD)], folder / f"{i:03d}.jpg")
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text('{"previous": "run"}\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "pcedge.cli", "predict", str(fixture_bundle), str(folder), "--jsonl", str(jsonl),
         "--backend", "ort-cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        scored = 0
        for line in process.stdout:
            scored += line.startswith(("good", "anomalous"))
            if scored == 3:
                process.send_signal(signal.SIGTERM)
                break
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err
    assert "Traceback" not in err and "interrupted by SIGTERM after" in err
    records = [strict_json(line) for line in jsonl.read_text().splitlines()]
    assert 3 <= len(records) < 300 and all("verdict" in r for r in records)  # the new run's lines, not the old file
    assert f"wrote {jsonl} ({len(records)} of 300 image(s), the run was interrupted)" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden temporary left


def test_sigterm_during_export_removes_its_partial_bundle(tmp_path):
    out = tmp_path / "part.pcedge"
    process = subprocess.Popen(
        [sys.executable, "-m", "pcedge.cli", "export", "--data", str(BSD), "-o", str(out), "--size", "112",
         "--threads", "1", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(f".part.pcedge.{process.pid}.*.partial")):  # the writer has started
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out_text, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err
    assert f"pcedge export: interrupted by SIGTERM; nothing written to {out}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder


def test_stale_partial_exports_of_dead_processes_are_removed(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # that process has exited
    target = tmp_path / "part.pcedge"
    stale = tmp_path / f".part.pcedge.{dead}.k3j_x9ab.partial"
    (stale / "check").mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half an export")
    stale_file = tmp_path / f".part.pcedge.{dead}.0a1b2c3d.tmp"
    stale_file.write_text("half")
    live = tmp_path / f".part.pcedge.{os.getpid()}.zzzzzzzz.partial"
    live.mkdir()
    other_bundle = tmp_path / f".other.pcedge.{dead}.aaaaaaaa.partial"
    other_bundle.mkdir()
    users = tmp_path / ".part.pcedge.notes.partial"  # not of our form: never touched
    users.mkdir()
    writer = BundleWriter(target)
    try:
        assert not stale.exists() and not stale_file.exists()
        assert live.exists() and other_bundle.exists() and users.exists()
        assert writer.tmp.name.startswith(f".part.pcedge.{os.getpid()}.") and writer.tmp.name.endswith(".partial")
    finally:
        writer.abort()


# ============================================================================ 20. symlink loops, same stems
def test_symlink_loops_are_reported_and_same_stems_keep_their_overlays(fixture_bundle, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(GOOD[0], folder / "part.jpg")
    cv2.imwrite(str(folder / "part.png"), cv2.imread(str(GOOD[1])))
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "gone.jpg").symlink_to(folder / "deleted.jpg")
    maps = tmp_path / "maps"
    assert main(["predict", str(fixture_bundle), str(folder), "--save-maps", str(maps), "--backend", "ort-cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'loop.png'}: symlink loop" in err
    assert f"{folder / 'gone.jpg'}: broken symlink" in err
    assert sorted(p.name for p in maps.iterdir()) == ["part_jpg_overlay.png", "part_png_overlay.png"]

    from pcedge.runtime.inputs import unique_names
    from pcedge.runtime.preprocess import list_images

    assert [p.name for p in list_images(folder)] == ["gone.jpg", "loop.png", "part.jpg", "part.png"]
    assert unique_names([folder / "a" / "x.JPG", folder / "a" / "x.jpg", folder / "a" / "y.png"]) == [
        "x_jpg", "x_jpg_2", "y"]


# ============================================================================ 21. hints and help
def test_next_hints_quote_paths_with_spaces(fixture_bundle, tmp_path, capsys):
    spaced = tmp_path / "line 3 bundles" / "my part.pcedge"
    spaced.parent.mkdir()
    shutil.copytree(fixture_bundle, spaced)
    assert main(["info", str(spaced)]) == 0
    hint = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next:")][0]
    words = shlex.split(hint)
    assert words[words.index("verify") + 1] == str(spaced)
    assert main(["predict", str(spaced), str(GOOD[0]), "--backend", "ort-cpu"]) == 0
    hint = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next:")][0]
    assert shlex.split(hint)[3] == str(spaced)


def test_export_help_states_the_coreset_default(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default 0.01 = 1 %" in text and "see README" not in text


def test_export_checks_are_the_exporters_own_bounds():
    """The argument parser and the library refuse the same values (one table of bounds, export/limits.py)."""
    from pcedge.export.fit import ExportConfig, check_config

    for field, value, flag in (("hnsw_M", 1, "--M"), ("reweight_b", 1, "--b"), ("target_fpr", 1e-300, "--fpr"),
                               ("coreset", float("inf"), "--coreset"), ("batch_size", 0, "--batch")):
        with pytest.raises(ValueError, match=flag):
            check_config(ExportConfig(data=BSD, output=Path("x.pcedge"), **{field: value}))
