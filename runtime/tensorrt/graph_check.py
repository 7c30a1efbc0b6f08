"""Will TensorRT 10's ONNX parser take this graph? A static check, run where TensorRT is absent.

The rules encode the support matrix of onnx-tensorrt (``docs/operators.md``, the parser inside TensorRT)
for the TensorRT 10 releases JetPack 6 ships (10.3), plus pcedge's own contract for the bundle's graph:

- default-domain ops only, from :data:`SUPPORTED_OPS`; opset :data:`MIN_OPSET`..:data:`MAX_OPSET`;
- Resize: ``mode`` nearest/linear, the supported coordinate-transformation and nearest modes, no
  antialiasing, ``stretch`` aspect policy, ``axes`` (if given) an iota;
- Pad: ``constant`` mode with static pads; AveragePool/MaxPool: 2D or 3D, no dilation, no Indices output;
  reduction axes and Squeeze/Unsqueeze axes initializers (the parser reads them as weights, a value
  computed from shapes is refused), TopK's K and CumSum's axis known at build time;
- one self-contained file (no external data) and every shape static except the batch dimension of the
  inputs (checked on inputs, outputs and, after ONNX shape inference, every intermediate tensor);
- float32 only: no float64 anywhere, and every tensor computed from the image is float32 (int64 is fine
  for shape arithmetic: Shape, Reshape targets, Resize scales, Slice bounds ...).

``onnx`` is imported inside :func:`check_tensorrt_compat` (it is not a device-runtime dependency).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Opset range of the default domain that the TensorRT 10.0-10.8 ONNX parser reads (TensorRT 10.3 is the
#: JetPack 6.1/6.2 release). Later parsers read more (10.9: up to 22, 10.13+: up to 24), never fewer.
MIN_OPSET = 9
MAX_OPSET = 20

#: Ops marked supported ("Y") in onnx-tensorrt's docs/operators.md for TensorRT 10 (the 10.15 matrix),
#: minus those later than the 10.3 parser: window functions and STFT (10.4/10.5); Attention,
#: RMSNormalization, RotaryEmbedding, TensorScatter (opset 23/24, beyond MAX_OPSET); and, conservatively,
#: ops absent from the TensorRT 8.5 matrix whose arrival in 10.x we could not date (CastLike, Mish).
#: DeformConv, Gelu, GroupNormalization, Hardmax and IsInf are in (parsed since TensorRT 10.1, before
#: JetPack 6's 10.3). A false alarm here costs less than a failed build on the device; the parser itself
#: (``pcedge build-engine``) remains the final word.
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU Hardmax
HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul
Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_COORDINATE_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"})
RESIZE_NEAREST_MODES = frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})
#: TopK's K must be below this (onnx-tensorrt operators.md).
TOPK_MAX_K = 3840

_REDUCE_OPS = frozenset(op for op in SUPPORTED_OPS if op.startswith("Reduce"))
#: Ops whose output describes a tensor's shape, not its values: their outputs are never "image data".
_SHAPE_OPS = frozenset({"Shape", "Size"})


def _node_label(node, index: int) -> str:
    return f"node '{node.name or f'#{index}'}' ({node.op_type})"


class _Graph:
    """Lookups over one ONNX graph: constants, producers, and which tensors carry image-derived data."""

    def __init__(self, onnx, graph):
        self.onnx = onnx
        self.graph = graph
        self.constants: dict[str, object] = {}
        for init in graph.initializer:
            self.constants[init.name] = init
        self.producer: dict[str, tuple[int, object]] = {}
        for index, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = (index, node)
            if node.op_type == "Constant" and node.output:
                self.constants[node.output[0]] = node
        # Forward pass in the graph's (topological) node order: a tensor carries image data when any input
        # of its producer does, except for shape queries.
        initializers = {init.name for init in graph.initializer}
        self.data: set[str] = {inp.name for inp in graph.input if inp.name not in initializers}
        for node in graph.node:
            if node.op_type in _SHAPE_OPS or node.op_type == "Constant":
                continue
            if any(name in self.data for name in node.input if name):
                self.data.update(out for out in node.output if out)

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def is_static(self, name: str) -> bool:
        """Known at engine build time: a constant, or computed from shapes and constants only."""
        return name not in self.data

    def constant_value(self, name: str):
        """The numpy value of an initializer or Constant output, or None."""
        source = self.constants.get(name)
        if source is None:
            return None
        numpy_helper = self.onnx.numpy_helper
        if hasattr(source, "op_type"):  # a Constant node
            for attr in source.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
            return None
        return numpy_helper.to_array(source)

    def label_of_tensor(self, name: str) -> str:
        if name in self.producer:
            index, node = self.producer[name]
            return f"tensor '{name}' (output of {_node_label(node, index)})"
        return f"tensor '{name}' (graph input)" if name in self.data else f"tensor '{name}'"


def _attributes(onnx, node) -> dict[str, object]:
    values = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        values[attr.name] = value.decode() if isinstance(value, bytes) else value
    return values


def _input(node, position: int) -> str:
    return node.input[position] if len(node.input) > position else ""


def _check_node(onnx, g: _Graph, node, index: int, opset: int) -> list[str]:
    """Op-specific restrictions of the TensorRT ONNX parser (and pcedge's contract)."""
    label = _node_label(node, index)
    attrs = _attributes(onnx, node)
    op = node.op_type
    problems: list[str] = []
    if op == "Resize":
        mode = attrs.get("mode", "nearest")
        if mode not in RESIZE_MODES:
            problems.append(f"{label}: Resize mode '{mode}' is not supported by TensorRT (only {sorted(RESIZE_MODES)})")
        coord = attrs.get("coordinate_transformation_mode", "half_pixel")
        if coord not in RESIZE_COORDINATE_MODES:
            problems.append(f"{label}: Resize coordinate_transformation_mode '{coord}' is not supported by TensorRT "
                            f"(only {sorted(RESIZE_COORDINATE_MODES)})")
        nearest = attrs.get("nearest_mode", "round_prefer_floor")
        if mode == "nearest" and nearest not in RESIZE_NEAREST_MODES:
            problems.append(f"{label}: Resize nearest_mode '{nearest}' is not supported by TensorRT")
        if attrs.get("antialias", 0):
            problems.append(f"{label}: Resize with antialias=1 is not supported by TensorRT")
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            problems.append(f"{label}: Resize keep_aspect_ratio_policy '{policy}' is not supported by TensorRT (only 'stretch')")
        axes = attrs.get("axes")
        if axes is not None and list(axes) != list(range(len(axes))):
            problems.append(f"{label}: Resize axes {list(axes)} must be 0..rank-1 in order for TensorRT")
    elif op == "Pad":
        mode = attrs.get("mode", "constant")
        if mode != "constant":
            problems.append(f"{label}: Pad mode '{mode}': pcedge's TensorRT graphs use constant padding only")
        if opset >= 11:
            for position, what in ((1, "pads"), (2, "constant_value"), (3, "axes")):
                name = _input(node, position)
                if name and not g.is_constant(name):
                    problems.append(f"{label}: Pad {what} '{name}' is computed at run time; it must be a constant")
    elif op in ("AveragePool", "MaxPool"):
        kernel = attrs.get("kernel_shape", [])
        if len(kernel) not in (2, 3):
            problems.append(f"{label}: {op} over {len(kernel)} spatial dims; TensorRT pools 2D or 3D only")
        dilations = attrs.get("dilations")
        if dilations and any(d != 1 for d in dilations):
            problems.append(f"{label}: {op} dilations {list(dilations)}; TensorRT needs none (all ones)")
        if op == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append(f"{label}: MaxPool's Indices output is not supported by TensorRT")
    elif op in _REDUCE_OPS:
        axes = _input(node, 1)
        if axes and not g.is_constant(axes):
            problems.append(f"{label}: {op} axes '{axes}' must be an initializer for TensorRT")
    elif op in ("Squeeze", "Unsqueeze"):
        axes = _input(node, 1)
        if axes and not g.is_constant(axes):
            # onnx-tensorrt reads these axes as weights: a value computed at run time, even from shapes
            # only, is refused ("Squeeze/Unsqueeze axes must be an initializer").
            problems.append(f"{label}: {op} axes '{axes}' are computed in the graph; TensorRT's parser needs "
                            "them as an initializer or Constant")
    elif op == "TopK":
        k_name = _input(node, 1)
        k = g.constant_value(k_name) if k_name else None
        if k is None:
            problems.append(f"{label}: TopK's K '{k_name}' must be a constant for TensorRT")
        elif int(k.reshape(-1)[0]) >= TOPK_MAX_K:
            problems.append(f"{label}: TopK K={int(k.reshape(-1)[0])}; TensorRT needs K < {TOPK_MAX_K}")
        if attrs.get("sorted", 1) != 1:
            problems.append(f"{label}: TopK sorted=0 is not supported by TensorRT")
    elif op == "CumSum":
        axis = _input(node, 1)
        if axis and not g.is_static(axis):
            problems.append(f"{label}: CumSum axis '{axis}' must be known at build time for TensorRT")
    elif op == "LayerNormalization":
        if len([o for o in node.output if o]) > 1:
            problems.append(f"{label}: only LayerNormalization's first output is supported by TensorRT")
    elif op == "Dropout":
        training = _input(node, 2)
        value = g.constant_value(training) if training else None
        if training and (value is None or bool(value.reshape(-1)[0])):
            problems.append(f"{label}: Dropout training_mode must be a constant False for TensorRT")
    return problems


def _walk_nodes(graph, prefix: str = ""):
    """``(label prefix, index, node)`` for every node, including those inside If/Loop/Scan bodies."""
    for index, node in enumerate(graph.node):
        yield prefix, index, node
        for attr in node.attribute:
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subgraphs:
                yield from _walk_nodes(sub, f"{prefix}{_node_label(node, index)} / {attr.name}: ")


def _dims(value_info) -> list[object] | None:
    """``[int | str | None]``: static size, symbol, or unknown per dimension; None when the rank is unknown."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    out: list[object] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            out.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            out.append(dim.dim_param)
        else:
            out.append(None)
    return out


def _dtype_name(onnx, elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "undefined"


def _check_interface(onnx, graph, initializers: set[str]) -> tuple[list[str], set[str]]:
    """Inputs and outputs: float32, static apart from a (possibly symbolic) batch dimension 0."""
    problems: list[str] = []
    batch_symbols: set[str] = set()
    for kind, values in (("input", [v for v in graph.input if v.name not in initializers]), ("output", graph.output)):
        for value in values:
            elem = value.type.tensor_type.elem_type
            if elem != onnx.TensorProto.FLOAT:
                problems.append(f"graph {kind} '{value.name}' is {_dtype_name(onnx, elem)}; pcedge graphs take and give float32")
            dims = _dims(value)
            if dims is None:
                problems.append(f"graph {kind} '{value.name}' has no shape; TensorRT needs its rank and static sizes")
                continue
            if dims and isinstance(dims[0], str) and kind == "input":
                batch_symbols.add(dims[0])
            for axis, dim in enumerate(dims[1:], start=1):
                if not isinstance(dim, int) or dim <= 0:
                    problems.append(f"graph {kind} '{value.name}' dimension {axis} is dynamic ({dim!r}); only the "
                                    "batch dimension (0) may be")
    return problems, batch_symbols


def _check_value_shapes(onnx, g: _Graph, inferred_graph, batch_symbols: set[str], initializers: set[str]) -> list[str]:
    """Every intermediate tensor: a known shape whose only dynamic size is an input's batch symbol."""
    problems: list[str] = []
    known = {v.name: v for v in inferred_graph.value_info}
    interface = {v.name for v in inferred_graph.input} | {v.name for v in inferred_graph.output}
    for node in g.graph.node:
        for name in node.output:
            if not name or name in interface or name in initializers:
                continue
            value = known.get(name)
            dims = _dims(value) if value is not None else None
            if dims is None:
                problems.append(f"{g.label_of_tensor(name)}: ONNX shape inference could not find its shape")
                continue
            bad = [(axis, dim) for axis, dim in enumerate(dims)
                   if not (isinstance(dim, int) and dim >= 0) and dim not in batch_symbols]
            if bad:
                described = ", ".join(f"dim {axis} = {dim if dim is not None else 'unknown'}" for axis, dim in bad)
                problems.append(f"{g.label_of_tensor(name)}: dynamic size other than the batch ({described}, "
                                f"shape {dims})")
    return problems


def _check_dtypes(onnx, g: _Graph, inferred_graph) -> list[str]:
    """No float64 anywhere; every tensor computed from the image is float32."""
    problems: list[str] = []
    double = onnx.TensorProto.DOUBLE
    for init in g.graph.initializer:
        if init.data_type == double:
            problems.append(f"initializer '{init.name}' is float64; TensorRT would cast it to float32 with clamping")
    for index, node in enumerate(g.graph.node):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == double:
                    problems.append(f"{_node_label(node, index)}: float64 constant; use float32")
    for value in inferred_graph.value_info:
        elem = value.type.tensor_type.elem_type
        if elem == double:
            problems.append(f"{g.label_of_tensor(value.name)}: float64; TensorRT computes in float32/float16")
        elif value.name in g.data and elem and elem != onnx.TensorProto.FLOAT:
            problems.append(f"{g.label_of_tensor(value.name)}: {_dtype_name(onnx, elem)} computed from the image; "
                            "pcedge's TensorRT graphs compute in float32 (integers only for shape arithmetic)")
    return problems


def _check_external_data(onnx, graph) -> list[str]:
    problems = []
    external = onnx.TensorProto.EXTERNAL
    for init in graph.initializer:
        if init.data_location == external:
            location = next((e.value for e in init.external_data if e.key == "location"), "?")
            problems.append(f"initializer '{init.name}' is stored outside the model (external data in '{location}'); "
                            "a bundle's model.onnx must be one self-contained file")
    for sparse in graph.sparse_initializer:
        problems.append(f"sparse initializer '{sparse.values.name}' is not supported by TensorRT's ONNX parser")
    return problems


def check_tensorrt_compat(onnx_path: str | os.PathLike[str]) -> list[str]:
    """Problems that would stop (or silently change) a TensorRT 10 build of ``onnx_path``; empty if none.

    Each problem names the node and op (or tensor) and what is wrong. An unreadable file is an error, not
    a problem: ``FileNotFoundError`` / ``ValueError`` naming the file.
    """
    try:
        import onnx
        import onnx.inliner
        import onnx.numpy_helper
        import onnx.shape_inference
    except ImportError as exc:
        raise ImportError(f"the TensorRT graph check needs the onnx package (pip install onnx): {exc}") from exc
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX model ({exc})") from exc

    problems: list[str] = []
    problems += _check_external_data(onnx, model.graph)
    if model.functions:
        # TensorRT's parser expands model-local functions itself; check the ops they are made of.
        model = onnx.inliner.inline_local_functions(model)

    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append(f"model opset {opset}: TensorRT 10.3 (JetPack 6) reads opsets {MIN_OPSET}..{MAX_OPSET}; "
                        f"export with opset {min(max(opset, MIN_OPSET), MAX_OPSET)}")

    for prefix, index, node in _walk_nodes(model.graph):
        label = prefix + _node_label(node, index)
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: op from domain '{node.domain}' needs a TensorRT plugin; use standard ONNX ops")
        elif node.op_type not in SUPPORTED_OPS:
            problems.append(f"{label}: op {node.op_type} is not supported by TensorRT 10's ONNX parser")

    g = _Graph(onnx, model.graph)
    for index, node in enumerate(model.graph.node):
        if node.domain in ("", "ai.onnx"):
            problems += _check_node(onnx, g, node, index, opset)

    initializers = {init.name for init in model.graph.initializer}
    interface_problems, batch_symbols = _check_interface(onnx, model.graph, initializers)
    problems += interface_problems
    try:
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # checker / inference errors are the model's problem, reported as such
        problems.append(f"the graph fails ONNX's own checks, so its shapes cannot be verified: {exc}")
        return problems
    problems += _check_value_shapes(onnx, g, inferred.graph, batch_symbols, initializers)
    problems += _check_dtypes(onnx, g, inferred.graph)
    return problems
