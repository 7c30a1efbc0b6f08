"""The Jetson estimate on paper: every published figure has its source, the roofline arithmetic against hand
computations, the graph's fused traffic against a real ONNX graph, and ``pcedge bench --target`` end to end
on the fixture bundle (its numbers recomputed from the JSON it writes).

No timing thresholds: the estimate's inputs are measured here, and only its arithmetic is checked.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pcedge.cli import main as pcedge_main
from pcedge.runtime.evaluation.flops import count_graph
from pcedge.runtime.evaluation.jetson_estimate import (
    GPU_REFERENCE, LAUNCH_OVERHEAD_S, STATEMENT, cpu_clock_hz, graph_work, roofline,
)
from pcedge.runtime.evaluation.targets import TARGETS, UnknownTarget, parse_targets

# --------------------------------------------------------------------------------------------------
# Published figures
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(TARGETS))
def test_every_target_figure_has_a_source_and_printed_words(key):
    figures = TARGETS[key].figures()
    assert set(figures) == {"gpu_fp16_dense", "gpu_int8_dense", "gpu_fp32", "memory_bandwidth", "cpu_cores",
                            "cpu_clock", "cpu_fp32_flops_per_cycle"}
    for name, figure in figures.items():
        assert figure.value > 0, name
        assert "https://" in figure.source, f"{key} {name}: no URL in its source"
        assert figure.quote.strip(), f"{key} {name}: no printed words quoted"
        # A figure not printed as is says how it was derived (and only then is it marked derived)
        assert figure.published == (figure.derivation == "")


def test_derived_figures_follow_their_stated_arithmetic():
    for device in TARGETS.values():
        # dense FP16 is half of dense INT8 on the same tensor cores (AGX Orin: 170 INT8 or 85 FP16, sparse)
        assert device.gpu_fp16_dense.value == device.gpu_int8_dense.value / 2
        assert device.cpu_core_flops == device.cpu_clock.value * 16
    # headline sparse TOPS / 2 = dense: 40 -> 20 (printed), 67 -> 33.5, the AGX GPU's 170 (not 275) -> 85
    assert TARGETS["orin-nano"].gpu_int8_dense.value == 20e12
    assert TARGETS["orin-nano-super"].gpu_int8_dense.value == 67e12 / 2
    assert TARGETS["agx-orin"].gpu_int8_dense.value == 170e12 / 2
    # cores x 2 x clock reproduces the AGX Orin's printed 5.32 TFLOPS, so it is used for the Orin Nano
    assert 2048 * 2 * 1.3e9 == pytest.approx(TARGETS["agx-orin"].gpu_fp32.value, rel=1e-3)
    assert TARGETS["orin-nano"].gpu_fp32.value == 1024 * 2 * 625e6
    assert TARGETS["orin-nano-super"].gpu_fp32.value == 1024 * 2 * 1020e6
    # 67 sparse TOPS is the 32 tensor cores at the MAXN_SUPER clock, as 40 is at 625 MHz
    assert 32 * 1020e6 * 2048 == pytest.approx(67e12, rel=0.01)
    assert 32 * 625e6 * 2048 == pytest.approx(40e12, rel=0.03)
    # memory: LPDDR5 peak figures as printed
    assert [TARGETS[k].memory_bandwidth.value for k in ("orin-nano", "orin-nano-super", "agx-orin")] == [68e9, 102e9, 204.8e9]


def test_parse_targets_comma_list_and_bad_names():
    assert [d.key for d in parse_targets("orin-nano, agx-orin,orin-nano")] == ["orin-nano", "agx-orin"]
    with pytest.raises(UnknownTarget, match="orin-nano, orin-nano-super, agx-orin"):
        parse_targets("xavier")
    with pytest.raises(UnknownTarget):
        parse_targets(" , ")


# --------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------


def test_roofline_compute_bound_by_hand():
    # 1 GFLOP at 1 TFLOP/s x 0.5 = 2 ms; 100 MB at 100 GB/s = 1 ms; 10 launches x 1 us
    r = roofline(1e9, 1e8, 1e12, 1e11, 0.5, 1.0, launches=10, launch_s=1e-6)
    assert r.compute_s == pytest.approx(2e-3) and r.memory_s == pytest.approx(1e-3)
    assert r.total_s == pytest.approx(2.01e-3) and r.bound == "compute"


def test_roofline_memory_bound_by_hand():
    # 10 MFLOP at 10 TFLOP/s = 1 us; 68 MB at 68 GB/s x 0.5 = 2 ms
    r = roofline(1e7, 68e6, 10e12, 68e9, 1.0, 0.5)
    assert r.memory_s == pytest.approx(2e-3) and r.total_s == pytest.approx(2e-3) and r.bound == "memory"
    with pytest.raises(ValueError):
        roofline(1e9, 1e6, 1e12, 1e11, 0.0)


def test_gpu_efficiency_from_the_reference_measurement_by_hand():
    # YOLOv8n: 8.9 GFLOP in 3.49 ms on an Orin Nano Super (33.5 dense INT8 TOPS)
    assert GPU_REFERENCE.efficiency() == pytest.approx(8.9e9 / 3.49e-3 / 33.5e12)
    assert 0.07 < GPU_REFERENCE.efficiency() < 0.08
    assert "https://" in GPU_REFERENCE.measurement_source and "yolov8.yaml" in GPU_REFERENCE.flops_source


def test_fusion_folds_an_activation_into_its_convolution(tmp_path):
    # Conv x [1, 3, 8, 8] -> y [1, 4, 8, 8], then Clip: one kernel, and Clip's read and write leave the traffic
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4, 8, 8])
    inits = [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
             numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["y", "lo", "hi"], ["z"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [z], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "conv_clip.onnx"
    onnx.save(model, str(path))
    work = graph_work(path)
    y = 4 * 8 * 8 * 4
    conv_bytes = 108 * 4 + 3 * 8 * 8 * 4 + y
    assert work.bytes_unfused == conv_bytes + 2 * y  # Clip reads y, writes z
    assert work.bytes_fused == conv_bytes
    assert work.kernels == 1 and work.flops == 2 * (4 * 64 * 27) + 2 * 4 * 64


def test_graph_work_of_the_exported_graph(fixture_bundle):
    path = fixture_bundle / "model.onnx"
    work, cost = graph_work(path), count_graph(path)
    graph = onnx.load(str(path)).graph
    elementwise = {"Clip", "Add", "Mul", "Sub", "Div", "Relu"}
    saved = sum(2 * op.write_bytes for op in cost.ops if op.op_type in elementwise)
    assert work.flops == cost.flops and work.bytes_unfused == cost.bytes
    assert work.bytes_fused == cost.bytes - saved and 0 < work.bytes_fused < work.bytes_unfused
    # one kernel per node that is neither elementwise nor a view (Reshape)
    assert work.kernels == sum(1 for n in graph.node if n.op_type not in elementwise | {"Reshape", "Constant"})
    assert work.uncounted == []


# --------------------------------------------------------------------------------------------------
# pcedge bench --target
# --------------------------------------------------------------------------------------------------


def _bench(bundle, tmp_path, *extra):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = pcedge_main(["bench", str(bundle), "--backend", "ort-cpu", "--index", "exact,hnsw", "--batch", "1",
                        "--repeats", "3", "--warmup", "1", "--json", str(out_json), "--md", str(out_md), *extra])
    return code, out_json, out_md


def test_bench_target_prints_and_writes_the_estimate(fixture_bundle, tmp_path, capsys):
    code, out_json, out_md = _bench(fixture_bundle, tmp_path, "--target", "orin-nano,agx-orin", "--target", "orin-nano")
    assert code == 0
    printed = capsys.readouterr().out
    assert STATEMENT in printed and "ESTIMATE ON PAPER" in printed
    assert f"python benchmarks/gpu_acceptance.py {fixture_bundle}" in printed

    report = json.loads(out_json.read_text())
    est = report["jetson_estimate"]
    assert est["statement"] == STATEMENT and "gpu_acceptance.py" in est["confirm_with"]
    assert "model_int8.onnx is not in this bundle" in est["int8_graph"]
    assert set(est["figures"]) == {"orin-nano", "agx-orin"}
    assert all("https://" in f["source"] for figs in est["figures"].values() for f in figs.values())
    assert [(e["target"], e["index_kind"]) for e in est["estimates"]] == [
        ("orin-nano", "exact"), ("orin-nano", "hnsw"), ("agx-orin", "exact"), ("agx-orin", "hnsw")]

    e_gpu = GPU_REFERENCE.efficiency()
    here_core = report["peak"]["sgemm_by_threads"]["1"]
    work = est["backbone"]
    P, N, D = report["patches"], report["bank_rows"], report["dim"]
    runs = {r["index_kind"]: r for r in report["runs"]}
    for e in est["estimates"]:
        device = TARGETS[e["target"]]
        bw = device.memory_bandwidth.value
        scale = here_core / (device.cpu_clock.value * 16)
        assert e["cpu_scale"] == pytest.approx(scale)
        run = {s["name"]: s for s in runs[e["index_kind"]]["stages"]}
        stages = {s["name"]: s for s in e["stages"]}
        assert [s["name"] for s in e["stages"]] == ["preprocess", "backbone", "index", "scoring"]
        for name, s in stages.items():
            assert s["measured_ms"] == run[name]["ms"]["p50"] and s["measured_min_ms"] == run[name]["ms"]["min"]
        # preprocess and scoring: the fastest call here x (one core here / one core there), preprocess floored
        # by its bytes
        pre = run["preprocess"]
        assert stages["preprocess"]["fp16_ms"] == pytest.approx(
            max(pre["ms"]["min"] * scale, pre["floor"]["bytes"] / bw * 1e3))
        assert stages["scoring"]["int8_ms"] == pytest.approx(run["scoring"]["ms"]["min"] * scale)
        # backbone: the roofline at FP16 (2 bytes per element) and INT8 (1 byte), plus launches
        for precision, rate, size in (("fp16", device.gpu_fp16_dense.value, 2), ("int8", device.gpu_int8_dense.value, 1)):
            expected = max(work["flops"] / (rate * e_gpu), work["bytes_fused"] * size / 4 / bw) \
                + work["kernels"] * LAUNCH_OVERHEAD_S
            assert stages["backbone"][f"{precision}_ms"] == pytest.approx(expected * 1e3)
        # index: exact on one core at the fraction of peak reached here; hnsw scaled like the other CPU stages
        if e["index_kind"] == "exact":
            e_index = min(2 * P * N * D / (run["index"]["ms"]["min"] / 1e3) / here_core, 1.0)  # > 1: disturbed peak
            expected = max(2 * P * N * D / (device.cpu_clock.value * 16 * e_index), 4 * (N * D + P * D) / bw)
            assert stages["index"]["fp16_ms"] == pytest.approx(expected * 1e3)
            assert any(f"all {int(device.cpu_cores.value)} cores" in n for n in e["notes"])
        else:
            assert stages["index"]["fp16_ms"] == pytest.approx(run["index"]["ms"]["min"] * scale)
        assert e["fp16_total_ms"] == pytest.approx(sum(s["fp16_ms"] for s in e["stages"]))
        # the optimistic alternative: the same CPU stages scaled by the clock ratio alone
        here_clock = cpu_clock_hz()
        if here_clock:
            cs = here_clock / device.cpu_clock.value
            assert e["clock_scale"] == pytest.approx(cs)
            index_ms = stages["index"]["fp16_ms"] if e["index_kind"] == "exact" else run["index"]["ms"]["min"] * cs
            expected = (max(pre["ms"]["min"] * cs, pre["floor"]["bytes"] / bw * 1e3) + stages["backbone"]["fp16_ms"]
                        + index_ms + run["scoring"]["ms"]["min"] * cs)
            assert e["fp16_total_ms_clock"] == pytest.approx(expected)
        assert e["int8_fps"] == pytest.approx(1e3 / e["int8_total_ms"])
        assert stages["backbone"]["int8_ms"] < stages["backbone"]["fp16_ms"]

    markdown = out_md.read_text()
    assert "## Jetson estimate (on paper, not measured)" in markdown and STATEMENT in markdown
    assert "| stage | measured here (ort-cpu): p50 (fastest) ms | estimate FP16 (ms) | estimate INT8 (ms) | bound |" in markdown
    assert "| figure | `orin-nano` | `agx-orin` |" in markdown and "**e_gpu**" in markdown


def test_bench_target_uses_the_int8_graph_when_the_bundle_has_one(fixture_bundle, tmp_path):
    """A real QDQ graph (ONNX Runtime's static quantisation, calibrated on the bundle's check images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from pcedge.runtime.bundle import open_bundle

    bundle = tmp_path / "int8.pcedge"
    shutil.copytree(fixture_bundle, bundle)
    images = open_bundle(bundle).load_check_arrays()[0].astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter([{"images": im[None]} for im in images])

        def get_next(self):
            return next(self._items, None)

    quantize_static(str(bundle / "model.onnx"), str(bundle / "model_int8.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    code, out_json, _ = _bench(bundle, tmp_path, "--target", "orin-nano-super")
    assert code == 0
    est = json.loads(out_json.read_text())["jetson_estimate"]
    assert est["int8_graph"].startswith("model_int8.onnx")
    fp32_macs = count_graph(bundle / "model.onnx").macs
    assert count_graph(bundle / "model_int8.onnx").macs == fp32_macs  # the same convolutions, quantised


@pytest.mark.parametrize("bad", [["--target", "orin-nan"], ["--target", "orin-nano,jetson-tx2"], ["--target", ""]])
def test_bench_rejects_an_unknown_target_listing_the_choices(fixture_bundle, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        pcedge_main(["bench", str(fixture_bundle), *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--target" in err and "orin-nano, orin-nano-super, agx-orin" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [(["--no-peak"], "drop --no-peak"), (["--batch", "4"], "include 1 in --batch")])
def test_bench_target_needs_the_peak_and_batch_1(fixture_bundle, extra, message, capsys):
    assert pcedge_main(["bench", str(fixture_bundle), "--target", "orin-nano", *extra]) == 2
    assert message in capsys.readouterr().err
