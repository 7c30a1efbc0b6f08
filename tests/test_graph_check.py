"""The TensorRT compatibility check: pcedge's own exports pass, hand-built bad graphs fail with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pcedge.runtime.tensorrt.graph_check import MAX_OPSET, check_tensorrt_compat

BACKBONES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")


def _export(name: str, path: Path, projection_dim: int | None = None) -> Path:
    from pcedge.export.backbones import build_backbone
    from pcedge.export.embedder import PatchEmbedder
    from pcedge.export.onnx_export import export_onnx

    embedder = PatchEmbedder(build_backbone(name, random_weights=True), projection_dim=projection_dim).eval()
    export_onnx(embedder, path, 224, 224)
    return path


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pcedge_exports_pass(backbone, tmp_path):
    path = _export(backbone, tmp_path / f"{backbone}.onnx")
    assert check_tensorrt_compat(path) == []


def test_pcedge_export_with_projection_passes(tmp_path):
    path = _export("resnet18", tmp_path / "projected.onnx", projection_dim=96)
    assert "MatMul" in {node.op_type for node in onnx.load(str(path)).graph.node}
    assert check_tensorrt_compat(path) == []


# ---------------------------------------------------------------------------------------------- hand-built graphs


def _save(tmp_path: Path, nodes, inputs, outputs, initializers=(), opset: int = 18, extra_opsets=()) -> Path:
    graph = helper.make_graph(nodes, "case", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    path = tmp_path / "case.onnx"
    onnx.save(model, path)
    return path


def _images(*shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("images", TensorProto.FLOAT, list(shape or ("batch", 3, 8, 8)))


def _out(*shape, name: str = "out") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _const(name: str, values, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def test_a_clean_hand_built_graph_passes(tmp_path):
    path = _save(tmp_path, [helper.make_node("Relu", ["images"], ["out"], name="relu")],
                 [_images()], [_out("batch", 3, 8, 8)])
    assert check_tensorrt_compat(path) == []


def test_shape_arithmetic_in_int64_is_allowed(tmp_path):
    """The TorchScript exporter's Shape -> Gather -> Concat -> Reshape pattern: int64, but only shapes."""
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="take_batch", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch1"], name="as_vector"),
        helper.make_node("Concat", ["batch1", "rest"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["images", "target"], ["out"], name="flatten"),
    ]
    inits = [_const("zero", 0, np.int64), _const("axis0", [0], np.int64), _const("rest", [192], np.int64)]
    assert check_tensorrt_compat(_save(tmp_path, nodes, [_images()], [_out("batch", 192)], inits)) == []


@pytest.mark.parametrize("op, attrs", [("Gelu", {}), ("IsInf", {}), ("Hardmax", {})])
def test_ops_parsed_since_tensorrt_10_1_pass(tmp_path, op, attrs):
    """Ops the parser supports from TensorRT 10.1 on (JetPack 6 has 10.3) are not false alarms."""
    out_type = TensorProto.BOOL if op == "IsInf" else TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node(op, ["images"], ["out"], name="n", **attrs)], "g", [_images()],
                              [helper.make_tensor_value_info("out", out_type, ["batch", 3, 8, 8])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    problems = check_tensorrt_compat(path)
    assert not [p for p in problems if "not supported" in p], problems


def test_shape_derived_unsqueeze_axes_are_refused(tmp_path):
    """The parser needs Squeeze/Unsqueeze axes as weights; axes computed from shapes are refused."""
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero", "one"], ["axes"], name="first_dim"),
        helper.make_node("Sub", ["axes", "axes"], ["zero_axis"], name="zero_axis"),
        helper.make_node("Unsqueeze", ["images", "zero_axis"], ["out"], name="add_dim"),
    ]
    inits = [_const("zero", [0], np.int64), _const("one", [1], np.int64)]
    problems = check_tensorrt_compat(_save(tmp_path, nodes, [_images()], [_out(1, "batch", 3, 8, 8)], inits))
    assert any("node 'add_dim' (Unsqueeze)" in p and "initializer" in p for p in problems), problems


def test_unsupported_op_is_named(tmp_path):
    path = _save(tmp_path, [helper.make_node("Det", ["images"], ["out"], name="determinant")],
                 [_images("batch", 3, 4, 4)], [_out("batch", 3)])
    problems = check_tensorrt_compat(path)
    assert problems == ["node 'determinant' (Det): op Det is not supported by TensorRT 10's ONNX parser"]


def test_custom_domain_op_needs_a_plugin(tmp_path):
    nodes = [helper.make_node("FusedGelu", ["images"], ["out"], name="gelu", domain="com.example")]
    path = _save(tmp_path, nodes, [_images()], [_out("batch", 3, 8, 8)],
                 extra_opsets=[helper.make_opsetid("com.example", 1)])
    assert any("node 'gelu' (FusedGelu)" in p and "com.example" in p and "plugin" in p
               for p in check_tensorrt_compat(path))


def test_dynamic_non_batch_dimension_fails(tmp_path):
    path = _save(tmp_path, [helper.make_node("Relu", ["images"], ["out"], name="relu")],
                 [_images("batch", 3, "height", 8)], [_out("batch", 3, "height", 8)])
    problems = check_tensorrt_compat(path)
    assert "graph input 'images' dimension 2 is dynamic ('height'); only the batch dimension (0) may be" in problems
    assert any(p.startswith("graph output 'out' dimension 2") for p in problems)


def test_dynamic_intermediate_dimension_fails(tmp_path):
    """NonZero's output length depends on the data: shape inference leaves it unknown."""
    nodes = [
        helper.make_node("NonZero", ["images"], ["where"], name="nonzero"),
        helper.make_node("Cast", ["where"], ["where_f"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["where_f", "axis1"], ["out"], name="count", keepdims=0),
    ]
    path = _save(tmp_path, nodes, [_images("batch", 3, 8, 8)], [_out(4)], [_const("axis1", [1], np.int64)])
    problems = check_tensorrt_compat(path)
    assert any(p.startswith("tensor 'where' (output of node 'nonzero' (NonZero)): dynamic size other than the batch")
               for p in problems)
    assert any("'where'" in p and "int64 computed from the image" in p for p in problems)


@pytest.mark.parametrize("attrs, expected", [
    ({"mode": "cubic"}, "Resize mode 'cubic' is not supported"),
    ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"},
     "coordinate_transformation_mode 'tf_crop_and_resize' is not supported"),
    ({"mode": "linear", "antialias": 1}, "antialias=1"),
])
def test_resize_with_unsupported_mode_fails(tmp_path, attrs, expected):
    nodes = [helper.make_node("Resize", ["images", "", "scales"], ["out"], name="upsample", **attrs)]
    path = _save(tmp_path, nodes, [_images()], [_out("batch", 3, 16, 16)], [_const("scales", [1, 1, 2, 2])])
    problems = check_tensorrt_compat(path)
    assert any(p.startswith("node 'upsample' (Resize)") and expected in p for p in problems), problems


def test_float64_fails(tmp_path):
    nodes = [
        helper.make_node("Cast", ["images"], ["wide"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Relu", ["wide"], ["wide_relu"], name="relu"),
        helper.make_node("Cast", ["wide_relu"], ["out"], name="to_float", to=TensorProto.FLOAT),
    ]
    problems = check_tensorrt_compat(_save(tmp_path, nodes, [_images()], [_out("batch", 3, 8, 8)]))
    assert any(p.startswith("tensor 'wide' (output of node 'to_double' (Cast)): float64") for p in problems)
    assert any(p.startswith("tensor 'wide_relu' (output of node 'relu' (Relu)): float64") for p in problems)


def test_float64_initializer_fails(tmp_path):
    nodes = [helper.make_node("Cast", ["images"], ["wide"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Add", ["wide", "offset"], ["sum"], name="add"),
             helper.make_node("Cast", ["sum"], ["out"], name="to_float", to=TensorProto.FLOAT)]
    path = _save(tmp_path, nodes, [_images()], [_out("batch", 3, 8, 8)], [_const("offset", [0.5], np.float64)])
    assert any(p.startswith("initializer 'offset' is float64") for p in check_tensorrt_compat(path))


def test_integer_image_data_fails(tmp_path):
    nodes = [helper.make_node("Cast", ["images"], ["ints"], name="quantise", to=TensorProto.INT64),
             helper.make_node("Cast", ["ints"], ["out"], name="back", to=TensorProto.FLOAT)]
    problems = check_tensorrt_compat(_save(tmp_path, nodes, [_images()], [_out("batch", 3, 8, 8)]))
    assert problems == ["tensor 'ints' (output of node 'quantise' (Cast)): int64 computed from the image; pcedge's "
                        "TensorRT graphs compute in float32 (integers only for shape arithmetic)"]


def test_pad_must_be_constant_mode_with_static_pads(tmp_path):
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    reflect = [helper.make_node("Pad", ["images", "pads"], ["out"], name="pad", mode="reflect")]
    path = _save(tmp_path, reflect, [_images()], [_out("batch", 3, 10, 10)], [_const("pads", pads, np.int64)])
    assert any("node 'pad' (Pad): Pad mode 'reflect'" in p for p in check_tensorrt_compat(path))

    runtime_pads = [helper.make_node("Shape", ["images"], ["shape"], name="shape"),
                    helper.make_node("Concat", ["shape", "shape"], ["pads"], name="pads_from_shape", axis=0),
                    helper.make_node("Pad", ["images", "pads"], ["out"], name="pad")]
    path = _save(tmp_path, runtime_pads, [_images(1, 3, 8, 8)], [_out(1, 3, 24, 24)])
    assert any("node 'pad' (Pad): Pad pads 'pads' is computed at run time" in p for p in check_tensorrt_compat(path))


def test_pooling_restrictions(tmp_path):
    nodes = [helper.make_node("MaxPool", ["images"], ["out", "indices"], name="pool", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1], dilations=[2, 2])]
    outputs = [_out("batch", 3, 6, 6), helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", 3, 6, 6])]
    problems = check_tensorrt_compat(_save(tmp_path, nodes, [_images()], outputs))
    assert any("MaxPool dilations [2, 2]" in p for p in problems)
    assert any("MaxPool's Indices output is not supported" in p for p in problems)

    pool_1d = [helper.make_node("AveragePool", ["images"], ["out"], name="avg1d", kernel_shape=[3])]
    path = _save(tmp_path, pool_1d, [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8])],
                 [_out("batch", 3, 6)])
    assert any("node 'avg1d' (AveragePool): AveragePool over 1 spatial dims" in p for p in check_tensorrt_compat(path))


def test_opset_outside_tensorrt_range_fails(tmp_path):
    path = _save(tmp_path, [helper.make_node("Relu", ["images"], ["out"], name="relu")], [_images()],
                 [_out("batch", 3, 8, 8)], opset=MAX_OPSET + 1)
    assert any(p.startswith(f"model opset {MAX_OPSET + 1}") for p in check_tensorrt_compat(path))


def test_external_data_fails(tmp_path):
    nodes = [helper.make_node("Add", ["images", "bias"], ["out"], name="add")]
    graph = helper.make_graph(nodes, "case", [_images()], [_out("batch", 3, 8, 8)],
                              initializer=[_const("bias", np.ones((3, 8, 8)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "external.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert any("initializer 'bias' is stored outside the model" in p and "weights.bin" in p
               for p in check_tensorrt_compat(path))


def test_unreadable_files_are_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        check_tensorrt_compat(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00 not protobuf")
    with pytest.raises(ValueError, match="junk.onnx: not a readable ONNX model"):
        check_tensorrt_compat(junk)
