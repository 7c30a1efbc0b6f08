"""Engine naming, selection, recording; the TensorRT side's behaviour on a machine without TensorRT."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pcedge.commands import build_engine as cli_build_engine
from pcedge.runtime.tensorrt import backend, build, device, engines, ort_provider
from pcedge.runtime.bundle import (
    BundleError, BundleWriter, EngineSpec, Geometry, IndexSpec, InputSpec, Manifest, MemoryBankSpec, OutputSpec, ThresholdSpec,
    open_bundle, sha256_file,
)
from pcedge.runtime.errors import BackendUnavailable, TensorRTUnavailable

ORIN = engines.DeviceInfo(sm="sm87", name="Orin", trt_version="10.3.0.30", fast_fp16=True, integrated=True,
                        multiprocessors=16)


def write_tiny_bundle(target: Path) -> Path:
    """A valid bundle around a real 6-node ONNX graph: images [B,3,16,16] -> embeddings [B,4,3]."""
    nodes = [
        helper.make_node("AveragePool", ["images"], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"], name="flatten"),
        helper.make_node("Transpose", ["flat"], ["embeddings"], name="to_patches", perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 4, 3])],
        initializer=[onnx.numpy_helper.from_array(np.array([-1, 3, 4], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    bank = np.random.default_rng(0).random((10, 3), dtype=np.float32)
    manifest = Manifest(
        input=InputSpec(shape=["batch", 3, 16, 16], geometry=Geometry(height=16, width=16)),
        output=OutputSpec(shape=["batch", 4, 3], grid_h=2, grid_w=2, dim=3, stride=8),
        memory_bank=MemoryBankSpec(n=10, dim=3),
        index=IndexSpec(file=None),  # no index file: the runtime builds the graph from the bank
        threshold=ThresholdSpec(value=0.5),
    )
    with BundleWriter(target) as writer:
        onnx.save(model, writer.path("model.onnx"))
        np.save(writer.path("memory_bank.npy"), bank)
        return writer.commit(manifest)


@pytest.fixture
def tiny_bundle(tmp_path) -> Path:
    return write_tiny_bundle(tmp_path / "tiny.pcedge")


@pytest.fixture
def without_tensorrt(monkeypatch):
    """Make `import tensorrt` fail here even on a machine that has it (a None entry blocks the import)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def without_cuda_python(monkeypatch):
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)


# ---------------------------------------------------------------------------------------------- naming


def test_engine_filename_encodes_sm_device_exact_trt_and_precision():
    assert engines.engine_filename(ORIN, "fp16") == "engines/sm87-orin-16sm-trt10.3.0.30-fp16.engine"
    rtx = engines.DeviceInfo("sm86", "NVIDIA GeForce RTX 3060", "10.12.1", True, False, 28)
    assert engines.engine_filename(rtx, "fp32", "ampere_plus", True) == \
        "engines/sm86-nvidia-geforce-rtx-3060-28sm-trt10.12.1-fp32-hc-vc.engine"
    assert engines.precision_from_filename("bundle/engines/sm87-orin-16sm-trt10.3.0.30-fp16.engine") == "fp16"
    assert engines.precision_from_filename("bundle/engines/sm86-x-1sm-trt10.12.1-fp32-hc-vc.engine") == "fp32"
    assert engines.precision_from_filename("my.plan") is None


@pytest.mark.parametrize("sm, version, precision, compat", [("87", "10.3", "fp16", "none"), ("sm87", "ten", "fp16", "none"),
                                                            ("sm87", "10.3", "int4", "none"),
                                                            ("sm87", "10.3", "fp16", "turing_plus")])
def test_engine_filename_rejects_malformed_parts(sm, version, precision, compat):
    with pytest.raises(ValueError):
        engines.engine_filename(engines.DeviceInfo(sm, "Orin", version, True, True, 16), precision, compat)


# ---------------------------------------------------------------------------------------------- selection


def _spec(device: engines.DeviceInfo, precision: str, **flags) -> EngineSpec:
    return EngineSpec(file=engines.engine_filename(device, precision, flags.get("hardware_compat", "none"),
                                                   flags.get("version_compatible", False)),
                      sm=device.sm, trt_version=device.trt_version, precision=precision, device_key=device.key, **flags)


def _device(**changes) -> engines.DeviceInfo:
    values = dict(sm="sm87", name="Orin", trt_version="10.3.0.30", fast_fp16=True, integrated=True, multiprocessors=16)
    values.update(changes)
    return engines.DeviceInfo(**values)


def test_select_prefers_fp16_among_engines_for_exactly_this_device_and_trt():
    manifest = Manifest(engines=[_spec(ORIN, "fp32"), _spec(ORIN, "fp16"), _spec(_device(trt_version="10.3.0.26"), "fp16"),
                                 _spec(_device(sm="sm72"), "fp16")])
    chosen = engines.select_engine(manifest, ORIN)
    assert (chosen.sm, chosen.trt_version, chosen.precision) == ("sm87", "10.3.0.30", "fp16")
    assert engines.select_engine(manifest, ORIN, "fp32").precision == "fp32"


def test_select_skips_another_gpu_model_version_or_precision_and_says_why():
    manifest = Manifest(engines=[_spec(ORIN, "fp32")])
    cases = {
        "built for sm87, this GPU is sm86": _device(sm="sm86", name="RTX 3060"),
        "built with TensorRT 10.3.0.30, this device has 10.3.0.31": _device(trt_version="10.3.0.31"),
        "built on device orin-16sm, this is orin-8sm": _device(multiprocessors=8),  # Orin Nano: also sm87
    }
    for why, other in cases.items():
        chosen, skipped = engines.choose_engine(manifest, other)
        assert chosen is None and skipped[0].startswith(f"{manifest.engines[0].file}: {why}")
    # An explicit precision is never swapped for another one.
    assert engines.select_engine(manifest, ORIN, "fp16") is None
    assert engines.select_engine(Manifest(), ORIN) is None
    # An entry from an older pcedge (no device key) is not trusted on any device.
    legacy = Manifest(engines=[EngineSpec(file="engines/sm87-trt10.3-fp16.engine", sm="sm87", trt_version="10.3.0.30",
                                          precision="fp16")])
    assert "not recorded" in engines.choose_engine(legacy, ORIN)[1][0]


def test_compatible_engines_match_across_devices_and_later_versions():
    hc = _spec(_device(sm="sm86", name="RTX A2000", multiprocessors=26), "fp16", hardware_compat="ampere_plus")
    vc = _spec(_device(trt_version="10.3.0.26"), "fp32", version_compatible=True)
    manifest = Manifest(engines=[hc, vc])
    assert engines.select_engine(manifest, ORIN).file == hc.file  # fp16 first
    assert engines.select_engine(manifest, ORIN, "fp32").file == vc.file  # 10.3.0.26 plan on 10.3.0.30
    assert engines.engine_mismatch(vc, _device(trt_version="10.2.0")) is not None  # older runtime
    assert engines.engine_mismatch(vc, _device(trt_version="11.0.0")) is not None  # another major
    assert "Ampere" in engines.engine_mismatch(hc, _device(sm="sm75"))
    # A plan built for exactly this device wins over a compatible one of the same precision.
    exact = _spec(ORIN, "fp16")
    assert engines.select_engine(Manifest(engines=[hc, exact]), ORIN).file == exact.file


# ---------------------------------------------------------------------------------------------- recording


def test_record_engine_updates_manifest_and_checksums(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    rel = engines.engine_filename(ORIN, "fp16")
    plan = tiny_bundle / rel
    plan.parent.mkdir()
    plan.write_bytes(b"serialized plan bytes")
    spec = EngineSpec(file=rel, sm="sm87", trt_version="10.3.0", precision="fp16", max_batch=8, device_name="Orin")
    engines.record_engine(bundle, spec)

    reopened = open_bundle(tiny_bundle)  # verifies every checksum, including the new plan's
    assert [e.file for e in reopened.manifest.engines] == [rel]
    assert reopened.manifest.files[rel].sha256 == sha256_file(plan)
    assert reopened.manifest.memory_bank.n == 10  # the rest of the manifest is untouched
    assert not list(tiny_bundle.glob("*.tmp"))

    # Rebuilding the same file replaces its entry instead of adding a second one.
    plan.write_bytes(b"a rebuilt plan")
    engines.record_engine(reopened, EngineSpec(file=rel, sm="sm87", trt_version="10.3.0", precision="fp16", max_batch=16))
    again = open_bundle(tiny_bundle)
    assert [(e.file, e.max_batch) for e in again.manifest.engines] == [(rel, 16)]
    assert json.loads((tiny_bundle / "manifest.json").read_text())["files"][rel]["sha256"] == sha256_file(plan)


def test_record_engine_refuses_a_missing_plan(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    before = (tiny_bundle / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="sm87-trt10.3-fp16.engine"):
        engines.record_engine(bundle, EngineSpec(file="engines/sm87-trt10.3-fp16.engine", sm="sm87", trt_version="10.3"))
    assert (tiny_bundle / "manifest.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------- ORT TensorRT EP


def test_ort_trt_provider_options_cache_keyed_by_device_and_profile_from_the_bundle(tiny_bundle):
    key = ort_provider.ort_trt_cache_key("sm87", "orin-16sm", "10.3.0.30")
    assert key == "sm87-orin-16sm-trt10.3.0.30"
    cache = ort_provider.ort_trt_cache_dir(tiny_bundle, key)
    assert cache == tiny_bundle / "engines" / "ort-trt" / key and cache.is_dir()
    options = ort_provider.ort_trt_provider_options(tiny_bundle, fp16=True, cache_dir=cache)
    assert options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] is True and options["trt_engine_cache_path"] == str(cache)
    assert options["trt_timing_cache_enable"] is True and options["trt_timing_cache_path"] == str(cache)
    assert options["trt_max_workspace_size"] == 1024 << 20
    # The profile comes from the bundle's input.opt_batch / input.max_batch (1 and 8 by default).
    assert options["trt_profile_min_shapes"] == "images:1x3x16x16"
    assert options["trt_profile_opt_shapes"] == "images:1x3x16x16"
    assert options["trt_profile_max_shapes"] == "images:8x3x16x16"
    bundle = open_bundle(tiny_bundle)
    manifest = bundle.manifest
    manifest.input.max_batch, manifest.input.opt_batch = 16, 4
    bundle.update_manifest(manifest)
    options = ort_provider.ort_trt_provider_options(tiny_bundle, fp16=False, cache_dir=cache)
    assert options["trt_profile_max_shapes"] == "images:16x3x16x16" and options["trt_fp16_enable"] is False
    assert options["trt_profile_opt_shapes"] == "images:4x3x16x16"
    assert open_bundle(tiny_bundle).manifest.files  # the cache folder is not checksummed
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        ort_provider.ort_trt_provider_options(tiny_bundle, fp16=True, cache_dir=cache, min_batch=4, max_batch=2)


def test_ort_trt_cache_of_a_read_only_bundle_goes_to_the_user_cache(tiny_bundle, tmp_path, monkeypatch):
    import os
    import stat

    if os.geteuid() == 0:
        # root ignores permission bits: make the bundle's cache path unusable another way (a file in the way).
        (tiny_bundle / "engines").write_bytes(b"not a directory")
    else:
        tiny_bundle.chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        cache = ort_provider.ort_trt_cache_dir(tiny_bundle, "sm87-orin-16sm-trt10.3.0.30")
    finally:
        tiny_bundle.chmod(stat.S_IRWXU)
    assert cache.is_dir() and cache.is_relative_to(tmp_path / "xdg" / "pcedge" / "ort-trt")
    assert cache.name == "sm87-orin-16sm-trt10.3.0.30"


# ---------------------------------------------------------------------------------------------- without TensorRT


def test_runtime_modules_import_without_touching_tensorrt_or_cuda():
    code = ("import sys, pcedge.runtime.tensorrt.backend, pcedge.runtime.tensorrt.build, pcedge.runtime.tensorrt.device, pcedge.runtime.tensorrt.engines, pcedge.commands.build_engine; "
            "print(sorted(m for m in sys.modules if m == 'tensorrt' or m.startswith('cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_probe_device_without_tensorrt_says_why_and_reports_cuda_state(without_tensorrt):
    with pytest.raises(TensorRTUnavailable) as caught:
        device.probe_device()
    message = str(caught.value)
    assert "tensorrt is not importable" in message and "python3-libnvinfer" in message
    # The CUDA side is reported too, whatever it is on this machine: missing bindings, no GPU, or the GPU found.
    assert any(part in message for part in ("cuda-python is not importable", "no CUDA GPU", "CUDA device 0:",
                                            "CUDA cannot start"))
    assert isinstance(caught.value, BackendUnavailable)


def test_probe_device_without_cuda_python_names_it(without_tensorrt, without_cuda_python):
    with pytest.raises(TensorRTUnavailable, match="cuda-python is not importable.*pip install cuda-python"):
        device.probe_device()


def test_tensorrt_backend_without_tensorrt_raises_unavailable(without_tensorrt, tmp_path):
    with pytest.raises(TensorRTUnavailable, match="tensorrt is not importable"):
        backend.TensorRTBackend(tmp_path / "sm87-trt10.3-fp16.engine")


def test_build_engine_checks_arguments_then_needs_tensorrt(without_tensorrt, tiny_bundle, tmp_path):
    args = dict(onnx_path=tiny_bundle / "model.onnx", plan_path=tmp_path / "x.engine", min_batch=1, opt_batch=1,
                max_batch=8, workspace_mb=256, timing_cache=None, input_name="images", input_chw=(3, 16, 16))
    with pytest.raises(ValueError, match="precision"):
        build.build_engine(precision="int4", **args)  # int8 is built (from the QDQ graph); int4 is not
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        build.build_engine(precision="fp16", **{**args, "opt_batch": 9})
    with pytest.raises(TensorRTUnavailable):
        build.build_engine(precision="fp16", **args)
    assert not (tmp_path / "x.engine").exists()


def _run_build_engine(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli_build_engine.add_arguments(parser)
    return cli_build_engine.run(parser.parse_args(argv))


def test_build_engine_cli_without_tensorrt_exits_2_with_the_reason(without_tensorrt, tiny_bundle, capsys):
    before = (tiny_bundle / "manifest.json").read_bytes()
    assert _run_build_engine([str(tiny_bundle), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pcedge build-engine: TensorRT cannot run here")
    assert "tensorrt is not importable" in err
    assert (tiny_bundle / "manifest.json").read_bytes() == before
    assert not (tiny_bundle / "engines").exists()


def test_build_engine_cli_refuses_a_tampered_bundle_before_probing(tiny_bundle, capsys):
    with open(tiny_bundle / "memory_bank.npy", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)[0]
        handle.seek(-1, 2)
        handle.write(bytes([last ^ 0xFF]))
    assert _run_build_engine([str(tiny_bundle)]) == 2
    assert "memory_bank.npy" in capsys.readouterr().err


def test_build_engine_cli_keeps_the_timing_cache_out_of_the_bundle(tiny_bundle, capsys):
    assert _run_build_engine([str(tiny_bundle), "--timing-cache", str(tiny_bundle / "engines" / "timing.cache")]) == 2
    assert "keep the timing cache outside the bundle" in capsys.readouterr().err
