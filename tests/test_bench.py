"""FLOP and byte counts against hand counts, and ``pcedge bench`` end to end on the fixture bundle.

No timing thresholds here: speed is measured by the benchmarks (JSON under results/), not by tests.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pcedge.cli import main as pcedge_main
from pcedge.runtime.evaluation.latency import backbone_work
from pcedge.runtime.evaluation.flops import FlopsUnavailable, count_graph

from conftest import BSD


# --------------------------------------------------------------------------------------------------
# Tiny graphs built with onnx.helper (input batch symbolic, as the exporter writes it)
# --------------------------------------------------------------------------------------------------


def one_node_model(node, x_shape, y_shape, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One node from input ``x [batch, *x_shape]`` to output ``y [batch, *y_shape]``, weights as initialisers."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *x_shape])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", *y_shape])
    inits = [numpy_helper.from_array(v.astype(np.float32), name) for name, v in weights.items()]
    graph = helper.make_graph([node], "tiny", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, x_shape) -> np.ndarray:
    """Run the tiny graph for real: the counted shapes must be the shapes ONNX Runtime produces."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.random.default_rng(0).random(x_shape, dtype=np.float32)})[0]


def test_conv_with_bias_matches_hand_count():
    # x [1, 3, 8, 8], w [4, 3, 3, 3], pad 1 -> y [1, 4, 8, 8]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = one_node_model(node, [3, 8, 8], [4, 8, 8], {"w": np.ones((4, 3, 3, 3)), "b": np.ones(4)})
    cost = count_graph(model)
    out = 4 * 8 * 8
    assert run_ort(model, (1, 3, 8, 8)).shape == (1, 4, 8, 8)
    assert cost.macs == out * 3 * 3 * 3 == 6912
    assert cost.flops == 2 * 6912 + out  # multiply-adds, plus the bias add per output
    assert cost.params == 4 * 3 * 3 * 3 + 4
    assert cost.weight_bytes == (108 + 4) * 4
    assert cost.activation_read_bytes == 3 * 8 * 8 * 4
    assert cost.activation_write_bytes == out * 4
    assert cost.min_bytes == (108 + 4) * 4 + 3 * 8 * 8 * 4 + out * 4
    assert cost.uncounted == [] and cost.unknown_shapes == []


def test_depthwise_conv_matches_hand_count():
    # depthwise: 8 channels, one 3x3 filter each, stride 2, pad 1: x [1, 8, 10, 10] -> y [1, 8, 5, 5]
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=8)
    model = one_node_model(node, [8, 10, 10], [8, 5, 5], {"w": np.ones((8, 1, 3, 3))})
    cost = count_graph(model)
    assert run_ort(model, (1, 8, 10, 10)).shape == (1, 8, 5, 5)
    assert cost.macs == 8 * 5 * 5 * 9 == 1800  # one 3x3 filter per output channel, not C_in * 9
    assert cost.flops == 3600  # no bias


def test_grouped_conv_and_batch():
    # 2 groups: x [B, 4, 6, 6], w [6, 2, 1, 1] -> y [B, 6, 6, 6]; each output sums 2 input channels
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1], group=2)
    model = one_node_model(node, [4, 6, 6], [6, 6, 6], {"w": np.ones((6, 2, 1, 1))})
    assert run_ort(model, (3, 4, 6, 6)).shape == (3, 6, 6, 6)
    assert count_graph(model).macs == 6 * 36 * 2 == 432
    at3 = count_graph(model, batch=3)
    assert at3.batch == 3 and at3.macs == 3 * 432
    per_image = at3.per_image()
    assert per_image.macs == 432
    assert per_image.weight_bytes == pytest.approx(6 * 2 * 4 / 3)  # weights read once per batch


def test_matmul_matches_hand_count():
    # x [B, 5, 7] @ w [7, 3] -> y [B, 5, 3]
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = one_node_model(node, [5, 7], [5, 3], {"w": np.ones((7, 3))})
    assert run_ort(model, (1, 5, 7)).shape == (1, 5, 3)
    cost = count_graph(model)
    assert cost.macs == 5 * 3 * 7 == 105
    assert cost.flops == 210
    assert count_graph(model, batch=4).macs == 4 * 105


def test_average_pool_counts_only_real_taps():
    # 3x3, stride 1, pad 1, count_include_pad = 0 on 4x4: taps per axis 2, 3, 3, 2 (10), per map 10 x 10
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    model = one_node_model(node, [2, 4, 4], [2, 4, 4], {})
    assert run_ort(model, (1, 2, 4, 4)).shape == (1, 2, 4, 4)
    assert count_graph(model).flops == 2 * 10 * 10


def test_op_without_a_rule_is_reported_not_counted_as_zero():
    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    cost = count_graph(one_node_model(node, [4, 4], [4, 4], {}))
    assert cost.flops == 0
    assert cost.uncounted == ["Softmax (1 node): no counting rule"]


def test_conv_macs_of_the_exported_graph_match_onnxruntime_shapes(fixture_bundle):
    """Every Conv's MACs recomputed from the output shapes ONNX Runtime really produces (not inferred ones)."""
    path = fixture_bundle / "model.onnx"
    cost = count_graph(path)
    model = onnx.load(str(path))
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    del model.graph.output[:]
    for node in convs:
        model.graph.output.append(helper.make_empty_tensor_value_info(node.output[0]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every Conv output
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": np.full((1, 3, 224, 224), 0.5, dtype=np.float32)})
    expected = sum(out.size * int(np.prod(weights[n.input[1]][1:])) for n, out in zip(convs, outputs))
    assert cost.by_op_type["Conv"].macs == expected
    assert cost.macs == expected  # only Conv does multiply-accumulates in this graph
    assert 100e6 < cost.flops < 1e9  # EfficientNet-Lite0 to block 10 at 224 px: a few hundred MFLOPs
    assert cost.uncounted == [] and cost.unknown_shapes == []
    # Weights: the Conv filters and biases and the input normalisation's Mul/Add constants, each once. The
    # Clip bounds, Resize scales and Reshape target are parameters of the op, not data it reads.
    graph = onnx.load(str(path)).graph
    readers = {name for node in graph.node if node.op_type in ("Conv", "Mul", "Add") for name in node.input}
    assert cost.params_bytes == sum(numpy_helper.to_array(i).nbytes for i in graph.initializer if i.name in readers)


def test_without_onnx_the_bench_says_install_onnx(fixture_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    with pytest.raises(FlopsUnavailable, match="pip install onnx"):
        count_graph(fixture_bundle / "model.onnx")
    work, note = backbone_work(fixture_bundle / "model.onnx")
    assert work is None and note.startswith("FLOPs: install onnx")


# --------------------------------------------------------------------------------------------------
# pcedge bench
# --------------------------------------------------------------------------------------------------

STAGES = ["preprocess", "backbone", "index", "scoring"]


def test_bench_writes_json_and_markdown(fixture_bundle, tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = pcedge_main(["bench", str(fixture_bundle), "--repeats", "3", "--warmup", "1", "--batch", "1,2",
                        "--index", "exact,hnsw", "--json", str(out_json), "--md", str(out_md)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out_json}" in printed and f"wrote {out_md}" in printed and "next: " in printed

    report = json.loads(out_json.read_text())
    assert report["settings"]["batches"] == [1, 2] and report["settings"]["repeats"] == 3
    assert len(report["machine"]["loadavg_start"]) == 3 and report["machine"]["versions"]["onnxruntime"]
    assert report["peak"]["sgemm_flops_per_s"] > 0 and report["peak"]["copy_bytes_per_s"] > 0
    assert "1" in report["peak"]["sgemm_by_threads"]  # the index's BLAS runs on one thread by default
    assert report["backbone_work"]["flops"] > 0 and report["backbone_work"]["bytes_unfused"] > 0
    assert "already network-sized" in report["images"]["note"]

    # this machine has no GPU: every GPU backend is skipped with its reason, ONNX Runtime CPU runs
    skipped = {s["backend"]: s["reason"] for s in report["skipped"]}
    assert {"tensorrt", "ort-cuda", "ort-trt"} <= set(skipped) and all(skipped.values())
    runs = report["runs"]
    assert [(r["backend"], r["index"], r["batch"]) for r in runs] == [
        ("ort-cpu", "exact", 1), ("ort-cpu", "exact", 2), ("ort-cpu", "hnsw", 1), ("ort-cpu", "hnsw", 2)]
    for run in runs:
        assert run["calls"] == 3 and run["images"] == 3 * run["batch"]
        assert [s["name"] for s in run["stages"]] == STAGES
        for stage in run["stages"]:
            ms = stage["ms"]
            assert ms["n"] == 3 and 0 < ms["min"] <= ms["p50"] <= ms["p95"] <= ms["p99"]
        assert run["per_image_ms"]["p50"] > 0 and run["call_ms"]["p50"] > 0 and run["throughput_images_per_s"] > 0
        floors = {s["name"]: s["floor"] for s in run["stages"]}
        assert floors["backbone"]["flops"] == report["backbone_work"]["flops"]
        assert 0 < floors["backbone"]["fraction_of_peak_flops"]
        if run["index_kind"] == "exact":
            assert floors["index"]["distance_computations"] == report["patches"] * report["bank_rows"]
            assert run["hnsw_ms_per_patch"] is None
        else:
            assert floors["index"]["distance_computations"] is None  # hnswlib does not expose it: not guessed
            assert "does not expose" in floors["index"]["note"] and run["hnsw_ms_per_patch"] > 0

    markdown = out_md.read_text()
    assert "| backend | index | batch | preprocess | backbone | index search | scoring | end to end | images/s |" in markdown
    assert markdown.count("| ort-cpu | exact (exact) |") == 2


def test_bench_decodes_given_images_once(fixture_bundle, tmp_path):
    out_json = tmp_path / "bench.json"
    folder = BSD / "test" / "pitting"
    code = pcedge_main(["bench", str(fixture_bundle), "--images", str(folder), "--backend", "ort-cpu", "--index", "exact",
                        "--batch", "1", "--repeats", "2", "--warmup", "0", "--no-peak", "--json", str(out_json)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["images"]["n"] == 8 and report["peak"] is None and report["skipped"] == []
    import cv2

    first = cv2.imread(str(sorted(folder.iterdir())[0]), cv2.IMREAD_UNCHANGED)
    assert report["images"]["frame_shapes"] == [list(first.shape)]  # the camera-sized frames, not 224 x 224
    assert report["runs"][0]["stages"][0]["floor"]["bytes"] == first.nbytes + 3 * 224 * 224 * 4


@pytest.mark.parametrize("bad", [["--batch", "0"], ["--batch", "1,x"], ["--index", "kd-tree"], ["--backend", "cuda"]])
def test_bench_rejects_bad_options(fixture_bundle, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        pcedge_main(["bench", str(fixture_bundle), *bad])
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_bench_names_a_missing_bundle(tmp_path, capsys):
    assert pcedge_main(["bench", str(tmp_path / "nope.pcedge"), "--no-peak"]) == 2
    assert "nope.pcedge" in capsys.readouterr().err
