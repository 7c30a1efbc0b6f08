"""Floors for measured times: the work per image of an ONNX graph, and this machine's peak rates.

:func:`count_graph` gives the arithmetic an ONNX graph must do (multiply-accumulates, FLOPs) and the
memory traffic of running it op by op, from shapes alone (``onnx.shape_inference`` with the symbolic batch
set to a number). :func:`measure_peak` measures what this machine sustains: float32 FLOP/s in a large
numpy matrix product (sgemm) and bytes/s in a large numpy copy. ``pcedge bench`` puts the two side by side
so that a measured stage time reads as a fraction of the machine's peak.

Counting rules (per node; ``out`` = output elements):

- ``Conv``: MACs ``= out * (C_in / group) * prod(kernel)`` (covers depthwise and grouped convolutions),
  FLOPs ``= 2 * MACs`` plus ``out`` for the bias add.
- ``MatMul``: MACs ``= out * K``; ``Gemm``: MACs ``= M * N * K``, plus ``M * N`` FLOPs for ``C``.
  FLOPs ``= 2 * MACs`` (the same convention as a BLAS sgemm's ``2 M N K``, which sets the measured peak).
- ``AveragePool``: one add per window tap (the divide replaces the first add), counted exactly at the
  borders when ``count_include_pad = 0`` (only real taps are summed). ``MaxPool``: taps - 1 comparisons.
- ``Resize``: ``linear`` reads ``2^d`` inputs per output for ``d`` resized axes: ``2^d`` multiplies and
  ``2^d - 1`` adds; ``cubic`` the same with ``4^d``; ``nearest`` none.
- elementwise ops: :data:`ELEMENTWISE_FLOPS` per output element (``Clip`` = a min and a max).
- data movement (``Transpose``, ``Concat``, ...): no FLOPs, but their bytes count; views (``Reshape``,
  ``Flatten``, ``Squeeze``, ...) move nothing.

Bytes, per node: weights read (initialisers and ``Constant`` outputs among its data inputs),
activations read, and its output written, at the tensors' element sizes. Their sum over nodes is the
traffic of an *unfused* op-by-op execution with nothing kept in cache between ops (an upper bound for a
runtime that fuses ``Conv + Clip`` and an overestimate when activations fit in cache); the graph's input,
output and weights, each touched once, are the lower bound (:attr:`GraphCost.min_bytes`).

Op types with no rule here are listed in :attr:`GraphCost.uncounted` (never silently counted as zero).

``onnx`` is not a runtime dependency (the device runs ONNX Runtime, which cannot list a graph's nodes):
it is imported inside :func:`count_graph`, which raises :class:`FlopsUnavailable` without it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: FLOPs per output element of elementwise ops.
ELEMENTWISE_FLOPS: dict[str, int] = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Max": 1, "Min": 1, "Pow": 1, "Neg": 1, "Abs": 1, "Sqrt": 1,
    "Reciprocal": 1, "Exp": 1, "Log": 1, "Relu": 1, "LeakyRelu": 2, "PRelu": 2, "Clip": 2,
    "Sigmoid": 3,  # exp, add, divide
    "HardSigmoid": 4,  # multiply, add, then min and max
    "HardSwish": 5,  # HardSigmoid, then a multiply
    "Tanh": 1, "Erf": 1, "Equal": 1, "Less": 1, "Greater": 1, "Where": 1, "Cast": 0,
    "BatchNormalization": 2,  # inference: x * scale' + shift' after folding
}

#: Ops that copy data without arithmetic: their bytes count, their FLOPs are zero.
DATA_MOVEMENT = frozenset({"Transpose", "Concat", "Slice", "Gather", "Pad", "Split", "Expand", "Tile", "DepthToSpace",
                           "SpaceToDepth"})
#: Ops an execution provider runs as views of their input (no bytes moved, no FLOPs).
VIEWS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
#: Ops on shapes and constants only (metadata, folded at load time).
METADATA = frozenset({"Shape", "Constant", "ConstantOfShape", "Range", "Size"})

#: Which inputs are data (the others are shapes, scales or scalar bounds and are not counted as traffic).
_DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "Resize": (0,), "Upsample": (0,), "Reshape": (0,), "Clip": (0,), "Pad": (0,), "Slice": (0,), "Expand": (0,),
    "Tile": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Gather": (0,), "Split": (0,),
}


class FlopsUnavailable(ImportError):
    """The ``onnx`` package (needed to read the graph's nodes) is not installed."""


class FlopsError(ValueError):
    """A graph whose costs cannot be counted (no shapes after inference); the message names the file."""


@dataclass
class OpCost:
    """One node's work at the counted batch."""

    name: str
    op_type: str
    macs: int
    flops: int
    weight_bytes: int  # initialisers / constants among its data inputs
    read_bytes: int  # activations among its data inputs
    write_bytes: int  # its outputs
    output_shape: list[int]


@dataclass
class OpTypeCost:
    """All nodes of one op type, summed."""

    count: int = 0
    macs: int = 0
    flops: int = 0
    bytes: int = 0  # weights + activations read + written


@dataclass
class GraphCost:
    """A graph's work at ``batch`` images (totals, not per image; see :meth:`per_image`)."""

    model: str
    batch: int
    macs: int
    flops: int
    params: int  # weight elements (initialisers and float constants read by counted nodes)
    params_bytes: int  # those weights' bytes, each counted once
    weight_bytes: int  # weights read, summed over nodes (a weight shared by two nodes counts twice)
    activation_read_bytes: int
    activation_write_bytes: int
    input_bytes: int  # the graph's inputs
    output_bytes: int  # the graph's outputs
    by_op_type: dict[str, OpTypeCost] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)  # "OpType (n nodes): no counting rule"
    unknown_shapes: list[str] = field(default_factory=list)  # nodes skipped: shapes not inferred
    ops: list[OpCost] = field(default_factory=list, repr=False)

    @property
    def bytes(self) -> int:
        """Unfused op-by-op traffic: weights + activations read + written (see the module docstring)."""
        return self.weight_bytes + self.activation_read_bytes + self.activation_write_bytes

    @property
    def min_bytes(self) -> int:
        """Lower bound: weights, the graph's inputs and outputs, each touched once."""
        return self.params_bytes + self.input_bytes + self.output_bytes

    def per_image(self) -> "ImageCost":
        """Per-image figures at this batch (weights are read once per batch, so they are shared)."""
        b = self.batch
        return ImageCost(
            batch=b, macs=self.macs / b, flops=self.flops / b, bytes=self.bytes / b, min_bytes=self.min_bytes / b,
            weight_bytes=self.params_bytes / b,
        )


@dataclass
class ImageCost:
    """Per-image work at a batch size (weights divided over the batch)."""

    batch: int
    macs: float
    flops: float
    bytes: float  # unfused op-by-op traffic
    min_bytes: float  # weights + input + output once
    weight_bytes: float  # the graph's weights, once per batch


# --------------------------------------------------------------------------------------------------
# Reading the graph
# --------------------------------------------------------------------------------------------------


def _import_onnx():
    try:
        import onnx  # noqa: F401  (not a runtime dependency: see the module docstring)
        import onnx.shape_inference  # noqa: F401
    except ImportError as exc:
        raise FlopsUnavailable(f"counting FLOPs needs the onnx package: pip install onnx ({exc})") from exc
    return onnx


def _fix_batch(model, batch: int) -> None:
    """Set the graph inputs' symbolic dimensions (the batch) to ``batch``, in place; forget old value_info.

    The exporter's ``value_info`` carries the symbolic ``batch`` through every tensor; clearing it makes
    inference recompute concrete shapes instead of merging them with the symbolic ones.
    """
    symbols: set[str] = set()
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") or not dim.HasField("dim_value"):
                symbols.add(dim.dim_param)
                dim.Clear()
                dim.dim_value = batch
    for value in model.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in symbols:
                dim.Clear()
                dim.dim_value = batch
    del model.graph.value_info[:]


class _Tensors:
    """Shapes, element sizes and weight-ness of every named tensor of an inferred graph."""

    def __init__(self, onnx, model):
        self.shape: dict[str, list[int] | None] = {}
        self.itemsize: dict[str, int] = {}
        self.weights: set[str] = set()
        for init in model.graph.initializer:
            self.shape[init.name] = list(init.dims)
            self.itemsize[init.name] = _itemsize(onnx, init.data_type)
            self.weights.add(init.name)
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t"):
                        self.shape[node.output[0]] = list(attr.t.dims)
                        self.itemsize[node.output[0]] = _itemsize(onnx, attr.t.data_type)
                        self.weights.add(node.output[0])
        for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
            if value.name in self.weights:
                continue
            tensor_type = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
            has_shape = tensor_type.HasField("shape")
            self.shape[value.name] = dims if has_shape and None not in dims else None
            self.itemsize[value.name] = _itemsize(onnx, tensor_type.elem_type)

    def known(self, name: str) -> bool:
        return self.shape.get(name) is not None

    def numel(self, name: str) -> int:
        return int(np.prod(self.shape[name], dtype=np.int64))

    def nbytes(self, name: str) -> int:
        return self.numel(name) * self.itemsize.get(name, 4)


def _itemsize(onnx, elem_type: int) -> int:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):  # UNDEFINED or a type numpy has no dtype for
        return 4


def _attributes(onnx, node) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# --------------------------------------------------------------------------------------------------
# Counting rules
# --------------------------------------------------------------------------------------------------


def _conv_macs(tensors: _Tensors, node, attrs: dict[str, Any]) -> int:
    """``out * (C_in / group) * prod(kernel)``: weight ``[M, C_in/group, k...]`` already holds C_in/group."""
    weight = tensors.shape[node.input[1]]
    per_output = int(np.prod(weight[1:], dtype=np.int64))  # (C_in / group) * kH * kW
    return tensors.numel(node.output[0]) * per_output


def _matmul_macs(tensors: _Tensors, node) -> int:
    k = tensors.shape[node.input[0]][-1]
    return tensors.numel(node.output[0]) * int(k)


def _gemm_macs(tensors: _Tensors, node, attrs: dict[str, Any]) -> int:
    a = tensors.shape[node.input[0]]
    k = a[0] if attrs.get("transA", 0) else a[1]
    return tensors.numel(node.output[0]) * int(k)


def _valid_taps(size_in: int, size_out: int, kernel: int, stride: int, pad_begin: int, dilation: int = 1) -> int:
    """Sum over output positions along one axis of the window taps that fall inside the input."""
    total = 0
    for o in range(size_out):
        start = o * stride - pad_begin
        taps = start + np.arange(kernel) * dilation
        total += int(((taps >= 0) & (taps < size_in)).sum())
    return total


def _pool_taps(tensors: _Tensors, node, attrs: dict[str, Any], include_pad: bool) -> int:
    """Total window taps summed over all outputs (a box window is separable: product over axes)."""
    x = tensors.shape[node.input[0]]
    y = tensors.shape[node.output[0]]
    kernel = list(attrs["kernel_shape"])
    spatial = len(kernel)
    if include_pad:
        return tensors.numel(node.output[0]) * int(np.prod(kernel))
    strides = list(attrs.get("strides", [1] * spatial))
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    dilations = list(attrs.get("dilations", [1] * spatial))
    per_map = 1
    for axis in range(spatial):
        per_map *= _valid_taps(x[2 + axis], y[2 + axis], kernel[axis], strides[axis], pads[axis], dilations[axis])
    return int(np.prod(y[:2], dtype=np.int64)) * per_map


def _resize_flops(tensors: _Tensors, node, attrs: dict[str, Any]) -> int:
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "nearest":
        return 0
    x, y = tensors.shape[node.input[0]], tensors.shape[node.output[0]]
    resized_axes = sum(1 for a, b in zip(x, y) if a != b)
    taps = (2 if mode == "linear" else 4) ** resized_axes  # cubic: 4 taps per axis
    return tensors.numel(node.output[0]) * (2 * taps - 1)  # taps multiplies, taps - 1 adds


def _node_cost(onnx, tensors: _Tensors, node) -> tuple[int, int] | None:
    """``(macs, flops)`` of one node, or None when there is no rule for its op type."""
    op = node.op_type
    attrs = _attributes(onnx, node)
    out = tensors.numel(node.output[0])
    if op == "Conv":
        macs = _conv_macs(tensors, node, attrs)
        bias = out if len(node.input) > 2 and node.input[2] else 0
        return macs, 2 * macs + bias
    if op == "MatMul":
        macs = _matmul_macs(tensors, node)
        return macs, 2 * macs
    if op == "Gemm":
        macs = _gemm_macs(tensors, node, attrs)
        bias = out if len(node.input) > 2 and node.input[2] else 0
        return macs, 2 * macs + bias
    if op == "AveragePool":
        # Adds: taps - 1 per output, plus one divide: taps per output in total.
        return 0, _pool_taps(tensors, node, attrs, include_pad=bool(attrs.get("count_include_pad", 0)))
    if op == "MaxPool":
        return 0, _pool_taps(tensors, node, attrs, include_pad=False) - out
    if op == "GlobalAveragePool":
        return 0, tensors.numel(node.input[0])
    if op in ("Resize", "Upsample"):
        return 0, _resize_flops(tensors, node, attrs)
    if op in ELEMENTWISE_FLOPS:
        return 0, out * ELEMENTWISE_FLOPS[op]
    if op in DATA_MOVEMENT or op in VIEWS or op in METADATA:
        return 0, 0
    return None


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def count_graph(model: "str | os.PathLike[str] | Any", batch: int = 1) -> GraphCost:
    """MACs, FLOPs and bytes of an ONNX graph (a path or a ``ModelProto``) at ``batch`` images.

    The graph inputs' symbolic dimensions are set to ``batch`` and shapes inferred with constant
    propagation; nodes whose output shape stays unknown are listed in ``unknown_shapes`` and not counted.
    Raises :class:`FlopsUnavailable` without the ``onnx`` package, :class:`FlopsError` for an unreadable file.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    onnx = _import_onnx()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        try:
            proto = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError / OSError / its own types
            raise FlopsError(f"{path}: not a readable ONNX model ({exc})") from exc
        label = str(path)
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        label = proto.graph.name or "<model>"
    _fix_batch(proto, batch)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # InferenceError
        raise FlopsError(f"{label}: shape inference failed ({exc})") from exc
    tensors = _Tensors(onnx, inferred)

    cost = GraphCost(model=label, batch=batch, macs=0, flops=0, params=0, params_bytes=0, weight_bytes=0, activation_read_bytes=0,
                     activation_write_bytes=0, input_bytes=0, output_bytes=0)
    initialiser_names = {init.name for init in inferred.graph.initializer}
    for value in inferred.graph.input:
        if value.name not in initialiser_names and tensors.known(value.name):
            cost.input_bytes += tensors.nbytes(value.name)
    for value in inferred.graph.output:
        if tensors.known(value.name):
            cost.output_bytes += tensors.nbytes(value.name)

    counted_weights: set[str] = set()
    uncounted: dict[str, int] = {}
    for node in inferred.graph.node:
        if node.op_type in METADATA:
            continue
        outputs = [o for o in node.output if o]
        if not outputs or not all(tensors.known(o) for o in outputs):
            cost.unknown_shapes.append(f"{node.op_type} {node.name or outputs}")
            continue
        data_inputs = [node.input[i] for i in _DATA_INPUTS.get(node.op_type, range(len(node.input)))
                       if i < len(node.input) and node.input[i]]
        if not all(tensors.known(name) for name in data_inputs):
            cost.unknown_shapes.append(f"{node.op_type} {node.name or outputs}")
            continue
        counts = _node_cost(onnx, tensors, node)
        if counts is None:
            uncounted[node.op_type] = uncounted.get(node.op_type, 0) + 1
            continue
        macs, flops = counts
        if node.op_type in VIEWS:
            weight_bytes = read_bytes = write_bytes = 0
        else:
            weight_bytes = sum(tensors.nbytes(n) for n in data_inputs if n in tensors.weights)
            read_bytes = sum(tensors.nbytes(n) for n in data_inputs if n not in tensors.weights)
            write_bytes = sum(tensors.nbytes(o) for o in outputs)
        for name in data_inputs:
            if name in tensors.weights and name not in counted_weights:
                counted_weights.add(name)
                cost.params += tensors.numel(name)
                cost.params_bytes += tensors.nbytes(name)
        op = OpCost(node.name, node.op_type, macs, flops, weight_bytes, read_bytes, write_bytes,
                    list(tensors.shape[outputs[0]]))
        cost.ops.append(op)
        cost.macs += macs
        cost.flops += flops
        cost.weight_bytes += weight_bytes
        cost.activation_read_bytes += read_bytes
        cost.activation_write_bytes += write_bytes
        summary = cost.by_op_type.setdefault(node.op_type, OpTypeCost())
        summary.count += 1
        summary.macs += macs
        summary.flops += flops
        summary.bytes += weight_bytes + read_bytes + write_bytes
    cost.uncounted = [f"{op} ({n} node{'s' if n > 1 else ''}): no counting rule" for op, n in sorted(uncounted.items())]
    return cost


# --------------------------------------------------------------------------------------------------
# The machine's peak rates
# --------------------------------------------------------------------------------------------------


@dataclass
class MachinePeak:
    """Best sustained rates measured here (the maximum over repeats: the least disturbed run)."""

    threads: int
    sgemm_flops_per_s: float  # float32 n x n matrix product at `threads` BLAS threads, 2 n^3 FLOPs per product
    sgemm_by_threads: dict[str, float]  # the same at 1 and at `threads` threads ("1", "2", ...)
    sgemm_n: int
    blas_threads: str  # how the BLAS thread count was set ("threadpoolctl", or "library default" without it)
    copy_bytes_per_s: float  # numpy copy of a large array: bytes read + bytes written, per second
    copy_mib: int  # size of the copied array
    copy_threads: int  # copies split into this many slices on as many Python threads (numpy releases the GIL)
    repeats: int
    seconds: float  # time spent measuring

    def sgemm_at(self, threads: int | None) -> float:
        """The sgemm peak at ``threads`` BLAS threads if measured, else at :attr:`threads`."""
        return self.sgemm_by_threads.get(str(threads), self.sgemm_flops_per_s) if threads else self.sgemm_flops_per_s


def _blas_threads_limited(threads: int):
    """A context that runs numpy's BLAS with ``threads`` threads, and how it was done."""
    try:
        from threadpoolctl import threadpool_limits  # not a runtime dependency (scikit-learn brings it)
    except ImportError:
        import contextlib

        return contextlib.nullcontext(), "library default (threadpoolctl not installed)"
    return threadpool_limits(limits=threads, user_api="blas"), "threadpoolctl"


def measure_sgemm(threads: int, n: int = 2048, repeats: int = 5) -> tuple[float, str]:
    """``(FLOP/s, how threads were set)``: the fastest of ``repeats`` float32 ``[n, n] @ [n, n]`` products
    (after one warm-up) on ``threads`` BLAS threads."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    limit, how = _blas_threads_limited(threads)
    best = float("inf")
    with limit:
        np.matmul(a, b, out=out)  # warm-up: thread pool start, page faults on `out`
        for _ in range(repeats):
            started = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - started)
    return 2.0 * n**3 / best, how


def measure_copy(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s (read + written) of the fastest of ``repeats`` copies of a ``mib`` MiB float32 array.

    The array is far larger than any cache, so this is DRAM bandwidth. The copy is split into ``threads``
    slices run on as many threads (numpy releases the GIL while copying).
    """
    src = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    dst = np.zeros_like(src)  # touched now, so page faults are not timed
    src_parts, dst_parts = np.array_split(src, threads), np.array_split(dst, threads)
    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats + 1):  # the first one warms up
            started = time.perf_counter()
            list(pool.map(np.copyto, dst_parts, src_parts))
            best = min(best, time.perf_counter() - started)
    return 2.0 * src.nbytes / best


def measure_peak(threads: int, sgemm_n: int = 2048, copy_mib: int = 256, repeats: int = 5) -> MachinePeak:
    """This machine's float32 matrix-product FLOP/s (at 1 and ``threads`` threads) and copy bandwidth.

    The bandwidth is the best of 1 and ``threads`` copying threads (one core often saturates memory and
    two threads then contend).
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    started = time.perf_counter()
    by_threads = {}
    for t in sorted({1, threads}):
        by_threads[str(t)], how = measure_sgemm(t, sgemm_n, repeats)
    copy_rates = {t: measure_copy(t, copy_mib, repeats) for t in sorted({1, threads})}
    copy_threads = max(copy_rates, key=copy_rates.get)
    return MachinePeak(
        threads=threads, sgemm_flops_per_s=by_threads[str(threads)], sgemm_by_threads=by_threads, sgemm_n=sgemm_n,
        blas_threads=how,
        copy_bytes_per_s=copy_rates[copy_threads], copy_mib=copy_mib, copy_threads=copy_threads, repeats=repeats,
        seconds=time.perf_counter() - started,
    )


__all__ = [
    "DATA_MOVEMENT",
    "ELEMENTWISE_FLOPS",
    "FlopsError",
    "FlopsUnavailable",
    "GraphCost",
    "ImageCost",
    "MachinePeak",
    "OpCost",
    "OpTypeCost",
    "VIEWS",
    "count_graph",
    "measure_copy",
    "measure_peak",
    "measure_sgemm",
]
