"""The INT8 (QDQ) graph: written at export from fixture images, gated on real parity figures, run by ONNX
Runtime CPU through ``--precision int8``, checked by ``verify``, refused clearly where a bundle has none, and
built by TensorRT (strict stand-ins from NVIDIA's binding sources) with the flags each release needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import BSD
from pcedge.cli import main
from pcedge.export.int8_gate import cosines
from pcedge.export.int8_graph import count_quantised
from pcedge.runtime.backends import open_backend
from pcedge.runtime.bundle import MANIFEST, MODEL_INT8_CPU_FILE, MODEL_INT8_FILE, BundleError, EngineSpec, open_bundle
from pcedge.runtime.detector import Detector, DetectorOptions
from pcedge.runtime.errors import BackendUnavailable
from pcedge.runtime.tensorrt import build, device, engines
from test_trt_standin import env_factory, images, tiny  # noqa: F401 (fixtures: stand-in TensorRT, tiny bundle)

#: Few calibration images keep the export quick; the benchmark calibrates on the default count.
FAST = dict(int8=True, int8_images=6, defect_sizes=())
COFFEE = Path(__file__).parent / "assets" / "coffee.png"


@pytest.fixture(scope="session")
def int8_bundle(bundle_factory) -> Path:
    """fixtures/ball_screw_drive with the INT8 graph, gated at a tolerance these fixtures meet."""
    return bundle_factory("bsd_int8", **FAST, int8_tolerance=0.5).bundle


@pytest.fixture(scope="session")
def refused_bundle(bundle_factory) -> Path:
    """The same export with a tolerance no quantised graph meets: the gate refuses the INT8 graph."""
    return bundle_factory("bsd_int8_refused", **FAST, int8_tolerance=1e-9).bundle


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- export


def test_export_writes_a_listed_qdq_graph_with_the_float32_interface(int8_bundle):
    bundle = open_bundle(int8_bundle)
    m = bundle.manifest
    assert m.model.int8_file == MODEL_INT8_FILE and MODEL_INT8_FILE in m.files
    counts = count_quantised(bundle.int8_model_path)
    assert counts["QuantizeLinear"] > 10 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    graph = onnx.load(str(bundle.int8_model_path)).graph
    # Symmetric quantisation everywhere (TensorRT's explicit quantisation): every zero point is 0.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    zero_points = [inits[n.input[2]] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    fp32, int8 = _session(bundle.model_path), _session(bundle.int8_model_path)
    for a, b in ((fp32.get_inputs(), int8.get_inputs()), (fp32.get_outputs(), int8.get_outputs())):
        assert [(x.name, x.type, x.shape) for x in a] == [(x.name, x.type, x.shape) for x in b]


def test_the_gate_records_real_parity_figures(int8_bundle):
    bundle = open_bundle(int8_bundle)
    report = bundle.manifest.model.int8
    assert report.shipped and report.tolerance == 0.5 and "<= tolerance" in report.reason
    assert report.calibration == "percentile" and report.n_calibration_images == 6
    assert report.float_convs > 0 and report.quantised_ops == ["Conv", "Add"]
    assert report.n_images >= 4 and "check images" in report.images
    assert 0.9 < report.min_cosine <= report.mean_cosine < 1.0  # quantised: close, not identical
    assert 0 < report.score_rel_error_median <= report.score_rel_error_max < 0.5
    # fixtures/ball_screw_drive has a labelled test split: both graphs' image AUROC on it.
    assert report.n_test_images > 0 and report.auroc_fp32 is not None
    assert report.auroc_delta == pytest.approx(report.auroc_int8 - report.auroc_fp32)
    # The figures are the graphs' own: recompute the cosine on the stored check images.
    images, _, _ = bundle.load_check_arrays()
    e32 = _session(bundle.model_path).run(None, {"images": images})[0]
    e8 = _session(bundle.int8_model_path).run(None, {"images": images})[0]
    assert cosines(e32, e8).min() >= report.min_cosine - 1e-6


def test_a_tight_tolerance_refuses_the_int8_graph_and_says_why(refused_bundle):
    bundle = open_bundle(refused_bundle)
    m = bundle.manifest
    assert m.model.int8_file is None and bundle.int8_model_path is None
    assert not (refused_bundle / MODEL_INT8_FILE).exists() and MODEL_INT8_FILE not in m.files
    report = m.model.int8
    assert not report.shipped and report.score_rel_error_median > report.tolerance
    assert "beyond the tolerance" in report.reason and "not shipped" in report.reason


def test_export_command_prints_the_refusal(tmp_path, capsys):
    code = main(["export", "--data", str(BSD), "-o", str(tmp_path / "r.pcedge"), "--quiet", "--threads", "2",
                 "--no-detectability", "--int8-images", "4", "--int8-tolerance", "0", "--int8-calibration", "minmax"])
    assert code == 0
    out = capsys.readouterr().out
    assert "INT8 graph NOT shipped" in out and "--int8-tolerance" in out and "minmax calibration on 4 images" in out


@pytest.mark.parametrize("flags, message", [
    (["--int8-calibration", "kl"], "invalid choice"),
    (["--int8-tolerance", "-0.1"], "must be >= 0"),
    (["--int8-images", "0"], "must be at least 1"),
])
def test_bad_int8_flags_exit_2_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--data", str(BSD), "-o", str(tmp_path / "x.pcedge"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- runtime


def test_ort_cpu_runs_the_int8_graph_when_asked(int8_bundle):
    bundle = open_bundle(int8_bundle)
    backend = open_backend("ort-cpu", bundle, threads=2, precision="int8")
    assert backend.precision == "int8" and "int8" in backend.description
    images, ref_emb, _ = bundle.load_check_arrays()
    out = backend(images)
    backend.close()
    assert out.shape == ref_emb.shape and cosines(out, ref_emb).mean() > 0.95
    # The interface other benchmarks use: the detector on the INT8 graph.
    with Detector.open(int8_bundle, DetectorOptions(backend="ort-cpu", threads=2, precision="int8")) as detector:
        assert detector.backend.precision == "int8"
        result = detector(np.ascontiguousarray((images[0].transpose(1, 2, 0) * 255).astype(np.uint8)))
        assert np.isfinite(result.score) and result.anomaly_map.shape == images.shape[2:]


def test_without_an_int8_graph_every_backend_refuses_instead_of_running_float32(refused_bundle, fixture_bundle):
    refused = open_bundle(refused_bundle)
    for kind in ("ort-cpu", "auto"):
        with pytest.raises(BackendUnavailable, match="parity gate refused"):
            open_backend(kind, refused, threads=2, precision="int8")
    with pytest.raises(BackendUnavailable, match="with --no-int8"):
        open_backend("ort-cpu", open_bundle(fixture_bundle), threads=2, precision="int8")
    with pytest.raises(BackendUnavailable, match="ort-trt: int8 is not offered"):
        open_backend("ort-trt", refused, precision="int8")


@pytest.mark.parametrize("command", [["predict", "IMAGE"], ["verify"], ["build-engine"], ["eval"]])
def test_commands_exit_2_with_the_reason_when_the_bundle_has_no_int8_graph(refused_bundle, capsys, command):
    argv = [command[0], str(refused_bundle)] + [str(COFFEE) if a == "IMAGE" else a for a in command[1:]]
    if command[0] == "eval":
        argv += ["--data", str(BSD)]
    assert main([*argv, "--precision", "int8"]) == 2
    assert "parity gate refused" in capsys.readouterr().err


def test_verify_int8_rechecks_cosine_and_scores_against_the_manifest(int8_bundle, capsys):
    assert main(["verify", str(int8_bundle), "--backend", "ort-cpu", "--precision", "int8", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "PASS  embeddings (int8)" in out and "PASS  image scores (int8)" in out and "the export's gate" in out


def test_verify_int8_fails_when_the_device_moves_scores_beyond_the_tolerance(int8_bundle, tmp_path, capsys):
    copy = tmp_path / "tight.pcedge"
    shutil.copytree(int8_bundle, copy)
    data = json.loads((copy / MANIFEST).read_text())
    for report in ("int8", "int8_cpu"):  # ort-cpu checks the CPU graph's figures (test_int8_cpu.py)
        data["model"][report]["tolerance"] = 1e-9  # the manifest is not a listed file: checksums still match
    (copy / MANIFEST).write_text(json.dumps(data))
    assert main(["verify", str(copy), "--backend", "ort-cpu", "--precision", "int8", "--threads", "2"]) == 1
    assert "FAIL  image scores (int8)" in capsys.readouterr().out


def test_info_shows_the_int8_figures(int8_bundle, refused_bundle, capsys):
    assert main(["info", str(int8_bundle)]) == 0
    out = capsys.readouterr().out
    assert "int8 graph  model_int8.onnx: shipped" in out and "image AUROC" in out
    assert main(["info", str(refused_bundle)]) == 0
    assert "int8 graph  none: NOT shipped" in capsys.readouterr().out


def test_bundles_written_before_int8_still_open(fixture_bundle, tmp_path, capsys):
    old = tmp_path / "old.pcedge"
    shutil.copytree(fixture_bundle, old)
    data = json.loads((old / MANIFEST).read_text())
    for key in ("int8_file", "int8", "int8_cpu_file", "int8_cpu"):
        data["model"].pop(key, None)
    (old / MANIFEST).write_text(json.dumps(data))
    bundle = open_bundle(old)
    assert bundle.manifest.model.int8 is None and bundle.int8_model_path is None
    assert main(["info", str(old)]) == 0
    assert "int8 graph  none (exported before INT8 graphs" in capsys.readouterr().out


@pytest.mark.parametrize("graph, field", [(MODEL_INT8_FILE, "int8_file"), (MODEL_INT8_CPU_FILE, "int8_cpu_file")])
def test_an_int8_file_that_is_not_listed_is_refused(int8_bundle, tmp_path, graph, field):
    copy = tmp_path / "unlisted.pcedge"
    shutil.copytree(int8_bundle, copy)
    data = json.loads((copy / MANIFEST).read_text())
    del data["files"][graph]
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"model.{field}: {graph} is not listed"):
        open_bundle(copy)


# ---------------------------------------------------------------------------------------------- TensorRT


def _spec(precision: str) -> EngineSpec:
    return EngineSpec(file=f"engines/sm87-orin-16sm-trt10.3.0.30-{precision}.engine", sm="sm87",
                      trt_version="10.3.0.30", precision=precision, device_key="orin-16sm")


def test_choose_engine_never_picks_int8_unless_asked(fixture_bundle):
    info = engines.DeviceInfo(sm="sm87", name="Orin", trt_version="10.3.0.30", fast_fp16=True, multiprocessors=16)
    manifest = open_bundle(fixture_bundle).manifest
    manifest.engines = [_spec("int8")]
    spec, skipped = engines.choose_engine(manifest, info)
    assert spec is None and "runs only when asked for (--precision int8)" in skipped[0]
    manifest.engines = [_spec("int8"), _spec("fp32")]
    assert engines.choose_engine(manifest, info)[0].precision == "fp32"
    assert engines.choose_engine(manifest, info, "int8")[0].precision == "int8"
    name = engines.engine_filename(info, "int8")
    assert name.endswith("-int8.engine") and engines.precision_from_filename(name) == "int8"


def _with_int8_graph(root: Path) -> Path:
    """A tiny bundle plus an explicitly quantised copy of its graph (a symmetric Q/DQ pair on the input)."""
    model = onnx.load(str(root / "model.onnx"))
    graph = model.graph
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(1 / 127, dtype=np.float32), "scale"),
                              onnx.numpy_helper.from_array(np.array(0, dtype=np.int8), "zero")])
    qdq = [helper.make_node("QuantizeLinear", ["images", "scale", "zero"], ["images_q"], name="q"),
           helper.make_node("DequantizeLinear", ["images_q", "scale", "zero"], ["images_dq"], name="dq")]
    for node in graph.node:
        node.input[:] = ["images_dq" if name == "images" else name for name in node.input]
    nodes = qdq + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, root / MODEL_INT8_FILE)
    bundle = open_bundle(root)
    manifest = bundle.manifest
    manifest.model.int8_file = MODEL_INT8_FILE
    bundle.update_manifest(manifest)
    return root


@pytest.mark.parametrize("release, flags", [("10.3", ["FP16", "INT8"]), ("10.16", ["FP16", "INT8"]), ("11", [])])
def test_int8_engine_is_built_from_the_qdq_graph_with_the_flags_each_release_needs(env_factory, tiny, release, flags):
    from pcedge.runtime.tensorrt.backend import TensorRTBackend

    env_factory(release)
    root = _with_int8_graph(tiny)
    bundle = open_bundle(root)
    info = device.probe_device()
    rel = engines.engine_filename(info, "int8")
    report = build.build_engine(bundle.model_path, root / rel, "int8", 1, 1, 4, 64, None, input_name="images",
                                input_chw=(3, 16, 16), int8_onnx_path=bundle.int8_model_path,
                                fast_fp16=info.fast_fp16)
    assert report.graph == bundle.int8_model_path and report.precision == "int8"
    header = json.loads(report.plan_path.read_bytes().split(b"\n")[1])
    assert header["flags"] == flags  # 11.x: strongly typed, no INT8/FP16 flag exists (and none is set)
    backend = TensorRTBackend(report.plan_path)
    x = images(2)
    expected = _session(bundle.int8_model_path).run(None, {"images": x})[0]
    tol = 5e-3 if "FP16" in flags else 1e-6  # the stand-in computes FP16-flagged plans in float16
    np.testing.assert_allclose(backend(x), expected, rtol=tol, atol=tol)
    assert backend.precision == "int8"
    backend.close()


def test_int8_build_without_a_fast_fp16_gpu_sets_int8_only(env_factory, tiny):
    env_factory("10.3")
    root = _with_int8_graph(tiny)
    bundle = open_bundle(root)
    report = build.build_engine(bundle.model_path, root / "engines/x-int8.engine", "int8", 1, 1, 4, 64, None,
                                input_name="images", input_chw=(3, 16, 16), int8_onnx_path=bundle.int8_model_path,
                                fast_fp16=False)
    assert json.loads(report.plan_path.read_bytes().split(b"\n")[1])["flags"] == ["INT8"]


def test_int8_build_without_the_qdq_graph_is_a_clear_error(env_factory, tiny):
    env_factory("10.3")
    bundle = open_bundle(tiny)
    with pytest.raises(build.TensorRTBuildError, match="INT8 \\(QDQ\\) graph.*--precision fp16 or fp32"):
        build.build_engine(bundle.model_path, tiny / "engines/x-int8.engine", "int8", 1, 1, 4, 64, None,
                           input_name="images", input_chw=(3, 16, 16), int8_onnx_path=None)


def test_int8_flag_names_exist_in_the_10x_bindings_and_are_gone_in_11():
    from trt_api.standin import load_api

    for release in ("10.3", "10.16"):
        assert {"INT8", "FP16"} <= set(load_api(release).API["BuilderFlag"]["values"])
    assert not {"INT8", "FP16"} & set(load_api("11").API["BuilderFlag"]["values"])
