"""Every shipped INT8 graph's own threshold (calibrated on its own out-of-fold or held-out scores), ONNX Runtime
CPU running the CPU INT8 graph by default only when it has one, ``--precision fp32`` forcing float32, and every
reader of a threshold (detector, predict, eval, watch, verify, info, Triton) applying the one of the graph
that runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from conftest import BSD
from pcedge.cli import main
from pcedge.export.calibration import calibrate_threshold
from pcedge.export.out_of_fold import fold_assignment
from pcedge.runtime.backends import cpu_default, open_backend
from pcedge.runtime.bundle import MANIFEST, MODEL_FILE, MODEL_INT8_CPU_FILE, BundleError, open_bundle
from pcedge.runtime.detector import Detector, DetectorOptions
from pcedge.runtime.index import ExactIndex
from pcedge.runtime.preprocess import fit_geometry, list_images, read_image, to_tensor
from pcedge.runtime.scoring import Scorer
from pcedge.runtime.serving.repository import client_parameters
from pcedge.runtime.thresholds import active_threshold
from test_int8 import FAST, int8_bundle, refused_bundle  # noqa: F401 (session fixtures: the INT8 exports)

GOOD = sorted((BSD / "test" / "good").iterdir())
BAD = sorted(p for d in (BSD / "test").iterdir() if d.name != "good" for p in d.iterdir())


@pytest.fixture(scope="session")
def full_bank_int8(bundle_factory) -> Path:
    """INT8 export with the whole memory bank: each fold bank is then every other fold's features, which the
    bundle's memory bank holds in image order, so a test can rebuild any fold bank by hand."""
    return bundle_factory("bsd_int8_full", **FAST, coreset=1.0, int8_tolerance=0.5).bundle


@pytest.fixture(scope="session")
def val_int8(bundle_factory) -> Path:
    """INT8 export whose thresholds come from held-out images (--val)."""
    return bundle_factory("bsd_int8_val", **FAST, val_dir=BSD / "test" / "good", int8_tolerance=0.5).bundle


def _inputs(paths, geometry) -> np.ndarray:
    return to_tensor([fit_geometry(read_image(p), geometry, str(p))[0] for p in paths])


def _scores(scorer: Scorer, emb: np.ndarray) -> np.ndarray:
    return np.array([scorer.image_score(emb[b], p).score for b, p in enumerate(scorer.patch_scores(emb))])


def _copy_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / MANIFEST).read_text())
    edit(data)
    (dst / MANIFEST).write_text(json.dumps(data))
    return dst


# ---------------------------------------------------------------------------------------------- export
def test_the_int8_threshold_comes_from_the_int8_graphs_out_of_fold_scores(full_bank_int8):
    bundle = open_bundle(full_bank_int8)
    m = bundle.manifest
    own = m.model.int8_cpu.threshold
    assert own is not None and m.model.int8.threshold is not None
    n = m.memory_bank.n_train_images
    assert own.n_images == n == m.threshold.n_images and own.folds == m.threshold.folds == 5
    assert own.target_fpr == m.threshold.target_fpr and "through model_int8_cpu.onnx" in own.source
    # Its value follows from its own scores by the float32 threshold's rule.
    again = calibrate_threshold(np.array(own.nominal_scores), own.target_fpr, "x", folds=5)
    assert own.value == pytest.approx(again.value) and own.scale == pytest.approx(again.scale)

    # Recompute a few by hand: the INT8 graph (a plain ONNX Runtime session) on the image, scored against the
    # features of every image outside its fold (the full bank, image-major).
    bank = bundle.load_memory_bank()
    by_image = bank.reshape(n, -1, bank.shape[1])
    folds = fold_assignment(n, 5, m.memory_bank.seed)
    paths = list_images(BSD / "train" / "good")
    session = ort.InferenceSession(str(bundle.int8_cpu_model_path), providers=["CPUExecutionProvider"])
    fp32 = np.array(m.threshold.nominal_scores)
    for i in (0, 7, n - 1):
        others = np.ascontiguousarray(by_image[folds != folds[i]].reshape(-1, bank.shape[1]))
        exact = ExactIndex(others)
        emb = session.run(None, {"images": _inputs([paths[i]], m.input.geometry)})[0]
        expected = _scores(Scorer(others, exact, exact, m.scoring), emb)[0]
        assert own.nominal_scores[i] == pytest.approx(expected, rel=1e-4), i
    # INT8 moves the scores (hence a threshold of its own), but only a little (the gate).
    rel = np.abs(np.array(own.nominal_scores) - fp32) / fp32
    assert rel.max() > 1e-3 and np.median(rel) < 0.5


def test_with_val_the_int8_threshold_comes_from_the_val_images_through_the_int8_graph(val_int8):
    bundle = open_bundle(val_int8)
    m = bundle.manifest
    bank = bundle.load_memory_bank()
    exact = ExactIndex(bank)
    scorer = Scorer(bank, exact, exact, m.scoring)
    val = list_images(BSD / "test" / "good")
    for report, path in ((m.model.int8_cpu, bundle.int8_cpu_model_path), (m.model.int8, bundle.int8_model_path)):
        own = report.threshold
        assert own.folds == 0 and own.n_images == len(val) == m.threshold.n_images
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        emb = session.run(None, {"images": _inputs(val, m.input.geometry)})[0]
        np.testing.assert_allclose(own.nominal_scores, _scores(scorer, emb), rtol=1e-4)


def test_no_int8_and_refused_graphs_have_no_threshold(fixture_bundle, refused_bundle):
    m = open_bundle(fixture_bundle).manifest  # exported with int8=False (--no-int8)
    assert m.model.int8 is None and m.model.int8_cpu is None and m.model.int8_cpu_file is None
    r = open_bundle(refused_bundle).manifest.model
    assert not r.int8_cpu.shipped and r.int8_cpu.threshold is None and r.int8.threshold is None


def test_a_bad_int8_threshold_in_the_manifest_is_refused_naming_the_field(int8_bundle, tmp_path):
    def edit(data):
        data["model"]["int8_cpu"]["threshold"]["value"] = -1.0

    bad = _copy_manifest(int8_bundle, tmp_path / "bad.pcedge", edit)
    with pytest.raises(BundleError, match=r"model\.int8_cpu\.threshold\.value: must be a positive"):
        open_bundle(bad, verify=False)


# ---------------------------------------------------------------------------------------------- runtime
def test_ort_cpu_runs_the_cpu_int8_graph_by_default_at_its_own_threshold(int8_bundle):
    bundle = open_bundle(int8_bundle)
    m = bundle.manifest
    own = m.model.int8_cpu.threshold
    assert own.value != m.threshold.value
    for kind in ("ort-cpu", "auto"):  # auto resolves to ort-cpu on this machine
        backend = open_backend(kind, bundle, threads=2)
        assert backend.precision == "int8" and backend.graph == bundle.int8_cpu_model_path
        assert "its gate passed and it has its own threshold" in backend.description
        backend.close()
        forced = open_backend(kind, bundle, threads=2, precision="fp32")
        assert forced.precision == "fp32" and forced.graph == bundle.model_path
        assert "float32 (--precision fp32)" in forced.description
        forced.close()
    frame = read_image(BAD[0])
    with Detector.open(int8_bundle, DetectorOptions(backend="ort-cpu", threads=2)) as default:
        assert default.threshold == own.value and default.scale == own.scale
        assert "model_int8_cpu.onnx's own" in default.description
        r8 = default(frame)
        session = ort.InferenceSession(str(bundle.int8_cpu_model_path), providers=["CPUExecutionProvider"])
        direct = session.run(None, {"images": _inputs([BAD[0]], m.input.geometry)})[0]
        np.testing.assert_allclose(default.embed(_inputs([BAD[0]], m.input.geometry)), direct, rtol=1e-5, atol=1e-5)
    with Detector.open(int8_bundle, DetectorOptions(backend="ort-cpu", threads=2, precision="fp32")) as fp32:
        assert fp32.threshold == m.threshold.value and fp32.scale == m.threshold.scale
        r32 = fp32(frame)
    assert r8.threshold == own.value and r32.threshold == m.threshold.value
    assert r8.anomalous == (r8.score > own.value)
    assert r8.normalised == pytest.approx(float(np.clip(0.5 + 0.5 * (r8.score - own.value) / own.scale, 0, 1)))
    assert r8.score != r32.score  # two graphs really ran
    with Detector.open(int8_bundle, DetectorOptions(backend="ort-cpu", threads=2, threshold=1.5)) as override:
        assert override.threshold == 1.5 and "(--threshold)" in override.description


def test_int8_on_request_uses_the_graph_it_runs_own_threshold(int8_bundle):
    bundle = open_bundle(int8_bundle)
    m = bundle.manifest
    with Detector.open(int8_bundle, DetectorOptions(backend="ort-cpu", threads=2, precision="int8")) as d:
        assert d.threshold == m.model.int8_cpu.threshold.value
    # The symmetric graph (ORT CUDA's) and a TensorRT INT8 plan (built from it) take model.int8's threshold;
    # float32/float16 plans and no backend at all (a Triton scorer) the float32 one.
    engines = bundle.root / "engines"
    cases = [(SimpleNamespace(precision="int8", graph=bundle.int8_model_path), m.model.int8.threshold),
             (SimpleNamespace(precision="int8", graph=engines / "sm87-orin-trt10.3-int8.engine"), m.model.int8.threshold),
             (SimpleNamespace(precision="fp16", graph=engines / "sm87-orin-trt10.3-fp16.engine"), m.threshold),
             (SimpleNamespace(precision="int8", graph=Path("/elsewhere/model_int8_cpu.onnx")), m.threshold),
             (None, m.threshold)]
    for backend, expected in cases:
        assert active_threshold(bundle, backend).spec == expected, backend


def test_bundles_without_the_int8_threshold_default_to_float32(int8_bundle, tmp_path, capsys):
    def edit(data):
        data["model"]["int8_cpu"].pop("threshold")
        data["model"]["int8"].pop("threshold")

    old = _copy_manifest(int8_bundle, tmp_path / "before_thresholds.pcedge", edit)
    bundle = open_bundle(old)
    assert bundle.manifest.model.int8_cpu.threshold is None
    assert cpu_default(bundle).graph is None and "no threshold of its own" in cpu_default(bundle).reason
    with Detector.open(old, DetectorOptions(backend="ort-cpu", threads=2)) as d:
        assert d.backend.graph == bundle.model_path and d.threshold == bundle.manifest.threshold.value
        assert "no threshold of its own" in d.description
    # Asked for, INT8 still runs, at the float32 threshold, and says so.
    with Detector.open(old, DetectorOptions(backend="ort-cpu", threads=2, precision="int8")) as d:
        assert d.backend.precision == "int8" and d.threshold == bundle.manifest.threshold.value
        assert "has none of its own" in d.description
    assert main(["info", str(old)]) == 0
    assert "ort-cpu     runs model.onnx by default, float32: model_int8_cpu.onnx has no threshold" in capsys.readouterr().out


def test_refused_and_no_int8_bundles_run_float32_by_default(refused_bundle, fixture_bundle):
    for path, why in ((refused_bundle, "gate refused"), (fixture_bundle, "no ONNX Runtime CPU INT8 graph")):
        with Detector.open(path, DetectorOptions(backend="ort-cpu", threads=2)) as d:
            assert d.backend.precision == "fp32" and d.backend.graph.name == MODEL_FILE
            assert why in d.description and d.threshold == d.manifest.threshold.value


# ---------------------------------------------------------------------------------------------- commands
def test_predict_eval_watch_and_verify_agree_on_the_int8_threshold(int8_bundle, tmp_path, capsys):
    m = open_bundle(int8_bundle).manifest
    own, fp32 = m.model.int8_cpu.threshold.value, m.threshold.value
    for flags, expected in (([], own), (["--precision", "fp32"], fp32)):
        out = tmp_path / f"predict{len(flags)}.jsonl"
        assert main(["predict", str(int8_bundle), str(GOOD[0]), str(BAD[0]), "--backend", "ort-cpu", "--threads", "2",
                     "--jsonl", str(out), "--quiet", *flags]) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["threshold"] for r in records] == [expected, expected]
        assert all(r["verdict"] == ("anomalous" if r["score"] > expected else "good") for r in records)

        report = tmp_path / f"eval{len(flags)}.json"
        assert main(["eval", str(int8_bundle), "--data", str(BSD), "--backend", "ort-cpu", "--threads", "2",
                     "--json", str(report), "--quiet", *flags]) == 0
        assert json.loads(report.read_text())["threshold"] == expected

        log = tmp_path / f"watch{len(flags)}.jsonl"
        assert main(["watch", str(int8_bundle), str(BSD / "test" / "good"), "--backend", "ort-cpu", "--threads", "2",
                     "--jsonl", str(log), "--max-frames", "2", *flags]) == 0
        start = json.loads(log.read_text().splitlines()[0])
        assert start["event"] == "start" and start["threshold"] == expected
        frames = [json.loads(line) for line in log.read_text().splitlines() if '"score"' in line]
        assert frames and all(f.get("threshold", expected) == expected for f in frames)
    capsys.readouterr()
    assert main(["verify", str(int8_bundle), "--backend", "ort-cpu", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "model_int8_cpu.onnx: INT8, the ort-cpu default" in out and "PASS  image scores (int8)" in out
    assert f"PASS  threshold (int8)       {own:.6g}" in out


def test_info_and_export_say_which_graph_and_threshold_run(int8_bundle, tmp_path, capsys):
    m = open_bundle(int8_bundle).manifest
    assert main(["info", str(int8_bundle)]) == 0
    out = capsys.readouterr().out
    assert f"threshold   {m.model.int8_cpu.threshold.value:.5f} for FPR 0.01 when {MODEL_INT8_CPU_FILE} runs" in out
    assert f"ort-cpu     runs {MODEL_INT8_CPU_FILE} by default, INT8" in out and "--precision fp32" in out
    assert main(["export", "--data", str(BSD), "-o", str(tmp_path / "cli.pcedge"), "--quiet", "--threads", "2",
                 "--int8-images", "6", "--int8-tolerance", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "its threshold" in out and "ONNX Runtime CPU runs the INT8 CPU graph by default" in out
    assert "int8_out_of_fold" in out


def test_no_int8_export_gives_a_float32_only_bundle(tmp_path, capsys):
    assert main(["export", "--data", str(BSD), "-o", str(tmp_path / "f32.pcedge"), "--quiet", "--threads", "2",
                 "--no-int8"]) == 0
    bundle = open_bundle(tmp_path / "f32.pcedge")
    assert bundle.manifest.model.int8 is None and bundle.manifest.model.int8_cpu is None
    assert not any("int8" in name for name in bundle.manifest.files)
    assert cpu_default(bundle).graph is None
    assert "ONNX Runtime CPU runs the INT8" not in capsys.readouterr().out


def test_triton_serves_float32_at_the_float32_threshold(int8_bundle):
    bundle = open_bundle(int8_bundle)
    params = client_parameters("screws", bundle)
    assert params["threshold"] == bundle.manifest.threshold.value != bundle.manifest.model.int8_cpu.threshold.value
    with Detector.open_scoring(int8_bundle) as scorer:  # the Triton scorer model's detector
        assert scorer.threshold == bundle.manifest.threshold.value
