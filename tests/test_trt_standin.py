"""build_engine and TensorRTBackend against strict TensorRT stand-ins (8.6, 10.3, 10.16, 11.x) built from
NVIDIA's binding sources (tests/trt_api), with host memory standing in for device memory."""

from __future__ import annotations

import argparse
import gc
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pcedge.commands import build_engine as cli_build_engine
from pcedge.export.fp16_graph import write_fp16_graph
from pcedge.runtime.backends import open_backend
from pcedge.runtime.bundle import MODEL_FP16_FILE, Bundle, open_bundle
from pcedge.runtime.errors import BackendUnavailable, TensorRTUnavailable
from pcedge.runtime.tensorrt import build, device, engines
from pcedge.runtime.tensorrt.backend import TensorRTBackend
from test_engines import write_tiny_bundle
from trt_api.standin import FakeCudart, SimulatedGPU, load_api, make_tensorrt

SUPPORTED = ("10.3", "10.16", "11")


# ---------------------------------------------------------------------------------------------- fixtures


def with_fp16_graph(root: Path) -> Path:
    """Add the float16 graph to a tiny bundle the way the exporter does, and record it."""
    bundle = open_bundle(root)
    write_fp16_graph(bundle.model_path, root / MODEL_FP16_FILE)
    manifest = bundle.manifest
    manifest.model.fp16_file = MODEL_FP16_FILE
    manifest.input.geometry.height = manifest.input.geometry.width = 16  # what the tiny graph takes
    bundle.update_manifest(manifest)
    return root


@pytest.fixture
def tiny(tmp_path) -> Path:
    return with_fp16_graph(write_tiny_bundle(tmp_path / "tiny.pcedge"))


class Env:
    """A stand-in TensorRT release and CUDA device installed as `tensorrt` and `cuda.bindings.runtime`."""

    def __init__(self, monkeypatch, release: str, gpu: SimulatedGPU):
        self.gpu = gpu
        self.cudart = FakeCudart(gpu)
        self.trt = make_tensorrt(release, gpu)
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", self.cudart)


@pytest.fixture
def env_factory(monkeypatch):
    def make(release: str, **gpu) -> Env:
        return Env(monkeypatch, release, SimulatedGPU(**gpu))

    return make


def build_plan(bundle_root: Path, precision: str = "fp32", max_batch: int = 4, **options) -> Path:
    bundle = open_bundle(bundle_root)
    info = device.probe_device()
    rel = engines.engine_filename(info, precision, options.get("hardware_compat", "none"),
                                  options.get("version_compatible", False))
    report = build.build_engine(bundle.model_path, bundle_root / rel, precision, 1, 1, max_batch, 64, None,
                                input_name="images", input_chw=(3, 16, 16), fp16_onnx_path=bundle.fp16_model_path,
                                fast_fp16=info.fast_fp16, **options)
    assert report.plan_path == bundle_root / rel and report.plan_bytes > 0
    return report.plan_path


def reference(bundle_root: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(bundle_root / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 16, 16), dtype=np.float32)


# ---------------------------------------------------------------------------------------------- the API surfaces


def test_generated_api_surfaces_hold_what_pcedge_uses_and_the_removals():
    for release in ("8.6", *SUPPORTED):
        api = load_api(release).API
        for cls in ("Builder", "OnnxParser", "ParserError", "IBuilderConfig", "Runtime", "ICudaEngine",
                    "IExecutionContext", "ILogger", "Logger", "BuilderFlag", "MemoryPoolType", "DataType"):
            assert cls in api, (release, cls)
        assert api["IExecutionContext"]["methods"]["execute_async_v3"] == [["stream_handle"]]
        assert api["OnnxParser"]["methods"]["parse"] == [["model", "path"]]
    # NVIDIA's removals for 11.x, and TensorRT 8.6's missing parser-error fields (faults 1 and 3).
    assert "FP16" not in load_api("11").API["BuilderFlag"]["values"]
    assert "platform_has_fast_fp16" not in load_api("11").API["Builder"]["properties"]
    assert "FP16" in load_api("10.3").API["BuilderFlag"]["values"]
    assert "node_name" not in load_api("8.6").API["ParserError"]["methods"]


def test_standin_refuses_names_and_keywords_the_release_lacks(env_factory):
    trt = env_factory("11").trt
    with pytest.raises(AttributeError, match="FP16"):
        trt.BuilderFlag.FP16
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    with pytest.raises(AttributeError, match="platform_has_fast_fp16"):
        builder.platform_has_fast_fp16
    with pytest.raises(TypeError, match="incompatible function arguments"):
        builder.create_network(flag=0)
    with pytest.raises(AttributeError):
        trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH


# ---------------------------------------------------------------------------------------------- build + run


@pytest.mark.parametrize("release", SUPPORTED)
@pytest.mark.parametrize("integrated", [True, False])
def test_build_engine_and_backend_run_every_batch_against_the_release(env_factory, tiny, release, integrated):
    env = env_factory(release, integrated=integrated, name="Orin" if integrated else "NVIDIA RTX A2000")
    plan = build_plan(tiny, "fp32", max_batch=4)
    backend = TensorRTBackend(plan, zero_copy=integrated)
    assert (backend.min_batch, backend.max_batch, backend.input_chw) == (1, 4, (3, 16, 16))
    for n in (1, 2, 3, 4, 5, 9):  # 5 and 9 exceed the profile maximum: split, not refused (fault 6)
        x = images(n, seed=n)
        np.testing.assert_allclose(backend(x), reference(tiny, x), rtol=1e-6, atol=1e-6)
    copies = env.gpu.calls.count("cudaMemcpyAsync")
    # Zero-copy on an integrated GPU: mapped memory, no host<->device copies; pinned staging otherwise.
    if integrated:
        assert copies == 0 and env.gpu.live("mapped") == 2 and env.gpu.live("device") == 0
    else:
        assert copies > 0 and env.gpu.live("pinned") == 2 and env.gpu.live("device") == 2
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 16, 16\]"):
        backend(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        backend(np.zeros((0, 3, 16, 16), np.float32))
    backend.close()
    backend.close()  # idempotent
    assert env.gpu.live() == 0 and not env.gpu.streams
    with pytest.raises(RuntimeError, match="closed"):
        backend(images(1))


@pytest.mark.parametrize("release", SUPPORTED)
def test_backend_serves_another_thread_and_frees_memory_without_close(env_factory, tiny, release):
    env = env_factory(release)
    plan = build_plan(tiny, "fp32", max_batch=2)
    backend = TensorRTBackend(plan, zero_copy=True)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for _ in range(5):
                results[seed] = backend(images(3, seed))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed, out in results.items():
        np.testing.assert_allclose(out, reference(tiny, images(3, seed)), rtol=1e-6, atol=1e-6)
    assert env.gpu.live() > 0
    del backend
    gc.collect()
    assert env.gpu.live() == 0  # fault 10: dropped without close() no longer leaks


@pytest.mark.parametrize("release", SUPPORTED)
def test_fp16_engine_uses_the_flag_on_10x_and_the_fp16_graph_on_11x(env_factory, tiny, release):
    env_factory(release)
    plan = build_plan(tiny, "fp16")
    assert plan.name.endswith("-fp16.engine")
    header = plan.read_bytes().split(b"\n")[1]
    if release == "11":
        assert b'"FP16"' not in header  # no FP16 flag on 11.x: the strongly typed float16 graph instead
    else:
        assert b'"FP16"' in header
    backend = TensorRTBackend(plan)
    x = images(2)
    out, ref = backend(x), reference(tiny, x)
    assert backend.precision == "fp16"
    np.testing.assert_allclose(out, ref, rtol=5e-3, atol=5e-3)
    backend.close()


def test_fp16_on_11x_without_the_fp16_graph_is_a_clear_error(env_factory, tmp_path):
    env_factory("11")
    root = write_tiny_bundle(tmp_path / "old.pcedge")  # an older bundle: no float16 graph
    with pytest.raises(build.TensorRTBuildError, match="float16 graph.*--precision fp32"):
        build_plan(root, "fp16")
    assert build_plan(root, "fp32").is_file()


def test_build_engine_auto_precision_on_11x_without_the_fp16_graph_builds_fp32_and_says_why(env_factory, tmp_path,
                                                                                             capsys):
    env_factory("11")
    root = write_tiny_bundle(tmp_path / "old.pcedge")
    assert _run_build_engine([str(root)]) == 0
    out = capsys.readouterr().out
    assert "precision   fp32 (auto: Orin sm87 has fast FP16, but TensorRT 11.1.0.0 needs the bundle's float16" in out
    assert open_bundle(root).manifest.engines[0].precision == "fp32"
    assert _run_build_engine([str(root), "--precision", "fp16"]) == 1  # an explicit request: the clear error
    assert "float16 graph" in capsys.readouterr().err


def test_fp16_is_refused_on_a_gpu_without_fast_fp16(env_factory, tiny):
    env_factory("10.3", sm="sm61", name="GeForce GTX 1080")
    assert device.probe_device().fast_fp16 is False
    with pytest.raises(build.TensorRTBuildError, match="no fast FP16"):
        build_plan(tiny, "fp16")


def test_rejected_timing_cache_is_replaced_and_its_error_does_not_head_a_later_message(env_factory, tiny, tmp_path):
    env_factory("10.3")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cache sm86")  # recorded on another GPU
    bundle = open_bundle(tiny)
    plan = tmp_path / "x.engine"
    report = build.build_engine(bundle.model_path, plan, "fp32", 1, 1, 2, 64, cache, input_name="images",
                                input_chw=(3, 16, 16))
    assert not report.timing_cache_reused and "another GPU" in report.notes[0]
    assert cache.read_bytes() == b"cache sm87"
    # A failing build after a rejected cache reports the build's own error, not the cache's.
    with pytest.raises(build.TensorRTBuildError) as caught:
        cache.write_bytes(b"cache sm86")
        build.build_engine(bundle.model_path, plan, "fp32", 1, 1, 2, 64, cache, input_name="images",
                           input_chw=(3, 16, 16), hardware_compat="same_compute_capability")
    assert "Timing cache" not in str(caught.value)


def test_same_compute_capability_needs_10_16(env_factory, tiny):
    env_factory("10.3")
    with pytest.raises(build.TensorRTBuildError, match="10.16"):
        build_plan(tiny, hardware_compat="same_compute_capability")


def test_parser_errors_name_the_node_on_10x(env_factory, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    env_factory("10.3")
    graph = helper.make_graph([helper.make_node("MyOp", ["images"], ["embeddings"], name="custom", domain="acme")],
                              "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 16, 16])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["b", 4, 3])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("acme", 1)]), path)
    with pytest.raises(build.TensorRTBuildError, match=r"node 'custom' \(MyOp\): No importer"):
        build.build_engine(path, tmp_path / "x.engine", "fp32", 1, 1, 2, 64, None, input_name="images",
                           input_chw=(3, 16, 16))


# ---------------------------------------------------------------------------------------------- TensorRT 8.6


def test_tensorrt_8_is_refused_with_the_alternative(env_factory, tiny):
    env_factory("8.6")
    with pytest.raises(TensorRTUnavailable, match="8.6.*--backend ort-cuda"):
        device.import_tensorrt()
    with pytest.raises(TensorRTUnavailable, match="--backend ort-cuda"):
        build_plan(tiny)
    assert _run_build_engine([str(tiny)]) == 2


def test_parser_error_formatting_survives_8_6_errors(env_factory):
    trt = env_factory("8.6").trt
    error = trt.ParserError._make(3, "n3", "Conv", "Network must have explicit batch dimension")
    with pytest.raises(AttributeError):
        error.node_name()  # absent in 8.6's bindings: what used to hide the real message
    assert build.format_parser_error(error) == "node '#3' (?): Network must have explicit batch dimension"


# ---------------------------------------------------------------------------------------------- the device probe


def test_probe_device_on_11x_creates_no_builder_and_reads_fp16_from_the_compute_capability(env_factory, monkeypatch):
    env = env_factory("11", name="Orin", multiprocessors=8)

    def no_builder(*args, **kwargs):
        raise AssertionError("probe_device created a Builder")

    monkeypatch.setattr(env.trt, "Builder", no_builder)
    info = device.probe_device()
    assert (info.sm, info.name, info.trt_version, info.fast_fp16, info.integrated) == ("sm87", "Orin", "11.1.0.0",
                                                                                      True, True)
    assert info.key == "orin-8sm"


def test_probe_device_names_an_insufficient_driver_instead_of_no_gpu(env_factory):
    env_factory("10.3", device_count_error="cudaErrorInsufficientDriver")
    with pytest.raises(TensorRTUnavailable) as caught:
        device.probe_device()
    message = str(caught.value)
    assert "cudaErrorInsufficientDriver" in message and "no CUDA GPU" not in message
    assert "driver supports CUDA none" in message and "cuda-python==12.6" in message


# ---------------------------------------------------------------------------------------------- engine keying


def test_engines_from_another_version_or_device_are_skipped_with_a_reason(env_factory, tiny):
    env_factory("10.3", name="Orin", multiprocessors=16)
    plan = build_plan(tiny)
    bundle = open_bundle(tiny)
    info = device.probe_device()
    spec = _spec(bundle, plan, info)
    engines.record_engine(bundle, spec)
    assert engines.choose_engine(bundle.manifest, info)[0].file == spec.file
    nano = engines.DeviceInfo("sm87", "Orin", info.trt_version, True, True, 8)
    chosen, skipped = engines.choose_engine(bundle.manifest, nano)
    assert chosen is None and "built on device orin-16sm, this is orin-8sm" in skipped[0]
    newer = engines.DeviceInfo("sm87", "Orin", "10.3.0.1", True, True, 16)
    chosen, skipped = engines.choose_engine(bundle.manifest, newer)
    assert chosen is None and "built with TensorRT 10.3.0.0, this device has 10.3.0.1" in skipped[0]


@pytest.mark.parametrize("release", ["10.3", "11"])
def test_version_compatible_plan_runs_on_a_later_release_of_the_same_major(monkeypatch, tiny, release):
    gpu = SimulatedGPU()
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", FakeCudart(gpu))
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(release, gpu))
    plan = build_plan(tiny, version_compatible=True)
    assert plan.name.endswith("-vc.engine")
    bundle = open_bundle(tiny)
    engines.record_engine(bundle, _spec(bundle, plan, device.probe_device(), version_compatible=True))
    later = make_tensorrt(release, gpu, version=f"{load_api(release).VERSION.split('.')[0]}.99.0.0")
    monkeypatch.setitem(sys.modules, "tensorrt", later)
    backend = open_backend("tensorrt", open_bundle(tiny))
    assert "-vc.engine" in backend.description
    np.testing.assert_allclose(backend(images(2)), reference(tiny, images(2)), rtol=1e-6, atol=1e-6)
    backend.close()


def test_hardware_compatible_plan_runs_on_another_ampere_plus_gpu(monkeypatch, tiny):
    gpu = SimulatedGPU(sm="sm86", name="NVIDIA RTX A2000", integrated=False, multiprocessors=26)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", FakeCudart(gpu))
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt("10.3", gpu))
    plan = build_plan(tiny, hardware_compat="ampere_plus")
    bundle = open_bundle(tiny)
    engines.record_engine(bundle, _spec(bundle, plan, device.probe_device(), hardware_compat="ampere_plus"))
    gpu.sm, gpu.name, gpu.integrated, gpu.multiprocessors = "sm87", "Orin", True, 16
    backend = open_backend("tensorrt", open_bundle(tiny))
    assert "zero-copy" in backend.description
    backend.close()
    gpu.sm = "sm75"
    with pytest.raises(BackendUnavailable, match="Ampere"):
        open_backend("tensorrt", open_bundle(tiny))


def _spec(bundle: Bundle, plan: Path, info, **flags):
    from pcedge.runtime.bundle import EngineSpec

    return EngineSpec(file=plan.relative_to(bundle.root).as_posix(), sm=info.sm, trt_version=info.trt_version,
                      precision=engines.precision_from_filename(plan), max_batch=4, device_name=info.name,
                      device_key=info.key, **flags)


# ---------------------------------------------------------------------------------------------- auto fallback


def _bundle_with_engine(tiny: Path, precision: str = "fp32") -> Bundle:
    plan = build_plan(tiny, precision)
    bundle = open_bundle(tiny)
    engines.record_engine(bundle, _spec(bundle, plan, device.probe_device()))
    return open_bundle(tiny)


@pytest.mark.parametrize("release", SUPPORTED)
def test_auto_uses_a_working_tensorrt_engine(env_factory, tiny, release):
    env_factory(release)
    backend = open_backend("auto", _bundle_with_engine(tiny))
    assert backend.name == "tensorrt" and backend.description.endswith("[auto]") and backend.auto_skipped == []
    backend.close()


@pytest.mark.parametrize("fault, expect", [
    ("cuda_starts", "factory function returned nullptr"),
    ("malloc_fails_after", "cudaErrorMemoryAllocation"),
    ("tensors", "expected tensors"),
])
def test_auto_falls_back_on_any_accelerator_failure_with_a_one_line_reason(env_factory, tiny, fault, expect):
    env = env_factory("11")
    bundle = _bundle_with_engine(tiny)
    if fault == "cuda_starts":
        env.gpu.cuda_starts = False
    elif fault == "malloc_fails_after":
        env.gpu.malloc_fails_after = 0
        env.gpu.integrated = False  # discrete: cudaMalloc for the device buffers
    else:
        manifest = bundle.manifest
        manifest.output.name = "features"  # the engine's output is still called "embeddings"
        bundle.update_manifest(manifest)
    backend = open_backend("auto", bundle)
    assert backend.name == "ort-cpu"
    assert backend.description.endswith("[auto; skipped tensorrt, ort-cuda]")
    reasons = {c.kind: c.reason for c in backend.auto_skipped}
    assert expect in reasons["tensorrt"] and "\n" not in reasons["tensorrt"] and len(reasons["tensorrt"]) <= 240
    assert not reasons["ort-cuda"].startswith("ort-cuda:")  # no doubled "ort-cuda: ort-cuda:"
    backend.close()
    assert env.gpu.live() == 0  # the failed backend's memory was released
    with pytest.raises(BackendUnavailable, match=expect):  # an explicit request: a clear error, no traceback
        open_backend("tensorrt", bundle)


def test_auto_falls_back_when_the_first_inference_fails(env_factory, tiny, monkeypatch):
    env_factory("10.3")
    bundle = _bundle_with_engine(tiny)

    def broken(self, stream_handle):
        raise RuntimeError("an illegal memory access was encountered")

    monkeypatch.setattr(sys.modules["tensorrt"].IExecutionContext, "execute_async_v3", broken)
    backend = open_backend("auto", bundle)
    assert backend.name == "ort-cpu"
    assert "illegal memory access" in backend.auto_skipped[0].reason


# ---------------------------------------------------------------------------------------------- commands


def _run_build_engine(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli_build_engine.add_arguments(parser)
    return cli_build_engine.run(parser.parse_args(argv))


def test_build_engine_command_records_the_keyed_engine_and_verify_passes(env_factory, tiny, capsys):
    from pcedge.cli import main

    env_factory("11", name="Orin", multiprocessors=16)
    assert _run_build_engine([str(tiny), "--max-batch", "4", "--version-compatible"]) == 0
    out = capsys.readouterr().out
    assert "engines/sm87-orin-16sm-trt11.1.0.0-fp16-vc.engine" in out and "model_fp16.onnx" in out
    spec = open_bundle(tiny).manifest.engines[0]
    assert (spec.device_key, spec.version_compatible, spec.hardware_compat, spec.max_batch) == ("orin-16sm", True,
                                                                                                "none", 4)
    capsys.readouterr()
    code = main(["predict", str(tiny), str(Path(__file__).parent / "assets" / "coffee.png"), "--backend", "tensorrt"])
    assert code == 0
    assert "tensorrt (TensorRT 11.1.0.0, fp16" in capsys.readouterr().err


def test_predict_auto_with_a_broken_tensorrt_says_why_in_one_line(env_factory, tiny, capsys):
    from pcedge.cli import main

    env = env_factory("11")
    _bundle_with_engine(tiny)
    env.gpu.cuda_starts = False  # trt.Runtime raises TypeError: what used to escape `auto` (fault 2)
    image = str(Path(__file__).parent / "assets" / "coffee.png")
    assert main(["predict", str(tiny), image]) == 0
    err = capsys.readouterr().err
    assert "ort-cpu" in err and "[auto; skipped tensorrt, ort-cuda]" in err and "nullptr" not in err
    assert "Traceback" not in err
    assert main(["predict", str(tiny), image, "--verbose"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "skipped tensorrt:" in line]
    assert len(lines) == 1 and "factory function returned nullptr" in lines[0]


def test_install_hints_pin_tensorrt_and_name_jetpacks_package(env_factory):
    hint = device.TENSORRT_INSTALL_HINT
    assert "'tensorrt-cu12>=10.3,<12'" in hint and "python3-libnvinfer" in hint
    assert "pip install tensorrt" not in hint
    env_factory("10.3")
    trt = sys.modules["tensorrt"]
    trt.__version__ = "12.0.0"
    with pytest.raises(TensorRTUnavailable, match="newer than pcedge supports"):
        device.import_tensorrt()


@pytest.mark.parametrize("shape", ["11", "broken"])
def test_pcedge_predict_auto_with_a_tensorrt_on_the_path_falls_back_in_one_line(tmp_path, shape):
    """A separate process with a stand-in `tensorrt` importable from PYTHONPATH (an 11.x one, or one whose
    CUDA does not start) and the real cuda-python: `pcedge predict` falls back to ONNX Runtime CPU."""
    import os
    import subprocess

    root = with_fp16_graph(write_tiny_bundle(tmp_path / "tiny.pcedge"))
    site = tmp_path / "site"
    site.mkdir()
    tests = Path(__file__).resolve().parent
    gpu = "SimulatedGPU(cuda_starts=False)" if shape == "broken" else "SimulatedGPU()"
    release = "11" if shape == "11" else "10.3"
    (site / "tensorrt.py").write_text(
        f"import sys\nsys.path.insert(0, {str(tests)!r})\n"
        "from trt_api.standin import SimulatedGPU, make_tensorrt\n"
        f"sys.modules['tensorrt'] = make_tensorrt({release!r}, {gpu})\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    image = str(tests / "assets" / "coffee.png")
    for verbose in ([], ["--verbose"]):
        done = subprocess.run([sys.executable, "-m", "pcedge.cli", "predict", str(root), image, *verbose],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert "ort-cpu" in done.stderr and "[auto; skipped tensorrt, ort-cuda]" in done.stderr
        reasons = [line for line in done.stderr.splitlines() if "skipped tensorrt:" in line]
        assert len(reasons) == (1 if verbose else 0)
    # The reason names what failed: on this machine the real cuda-python has no driver (or, on a GPU host,
    # TensorRT finds no engine built for it).
    assert any(word in reasons[0] for word in ("CUDA cannot start", "no CUDA GPU", "no TensorRT engine"))


@pytest.mark.parametrize("with_tensorrt", [True, False])
def test_gpu_acceptance_script_builds_compares_verifies_and_times_or_reports_what_is_missing(
        env_factory, tiny, tmp_path, monkeypatch, with_tensorrt):
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import gpu_acceptance
    finally:
        sys.path.pop(0)
    env_factory("11")
    if not with_tensorrt:
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    _add_check_data(tiny)
    before = (tiny / "manifest.json").read_bytes()
    out = tmp_path / "report.json"
    image = str(Path(__file__).parent / "assets" / "coffee.png")
    code = gpu_acceptance.main([str(tiny), "--images", image, "--runs", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert (tiny / "manifest.json").read_bytes() == before  # the bundle itself is never modified
    assert report["loadavg_start"] and report["versions"]["onnxruntime"]
    assert steps["latency ort-cpu"]["ok"]
    assert set(steps["latency ort-cpu"]["figures"]) >= {"batch1", "batch4", "batch8"}
    if with_tensorrt:
        assert code == 0 and report["device"]["key"] == "orin-16sm"
        for precision in ("fp32", "fp16"):
            assert steps[f"build {precision}"]["ok"], steps[f"build {precision}"]["detail"]
            assert steps[f"compare tensorrt {precision}"]["figures"]["min_cosine"] > 0.999
            assert steps[f"verify tensorrt {precision}"]["ok"], steps[f"verify tensorrt {precision}"]["detail"]
            assert steps[f"latency tensorrt {precision}"]["ok"], steps[f"latency tensorrt {precision}"]["detail"]
    else:
        assert not any(name.startswith("build") for name in steps)
        assert any("tensorrt is not importable" in line for line in report["missing"])


def _add_check_data(root: Path) -> None:
    """Reference data for `verify` in a tiny bundle: images, ONNX Runtime embeddings, exact image scores."""
    from pcedge.runtime.index import ExactIndex
    from pcedge.runtime.scoring import Scorer

    bundle = open_bundle(root)
    x = images(3, seed=7)
    emb = reference(root, x)
    bank = bundle.load_memory_bank()
    exact = ExactIndex(bank)
    scorer = Scorer(bank, exact, exact, bundle.manifest.scoring)
    scores = np.array([scorer.image_score(emb[i], p).score for i, p in enumerate(scorer.patch_scores(emb))],
                      dtype=np.float32)
    (root / "check").mkdir()
    for name, array in (("images", x), ("embeddings", emb), ("scores", scores)):
        np.save(root / "check" / f"{name}.npy", array)
    manifest = bundle.manifest
    manifest.check.images, manifest.check.embeddings, manifest.check.scores = (
        "check/images.npy", "check/embeddings.npy", "check/scores.npy")
    manifest.check.names = ["a", "b", "c"]
    bundle.update_manifest(manifest)


def test_ort_cuda_fp16_needs_the_float16_graph(tmp_path):
    old = open_bundle(write_tiny_bundle(tmp_path / "old.pcedge"))
    with pytest.raises(BackendUnavailable, match="no float16 graph"):
        open_backend("ort-cuda", old, precision="fp16")
