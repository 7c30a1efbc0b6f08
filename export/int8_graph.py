"""The bundle's INT8 graphs: ``model.onnx`` explicitly quantised (QuantizeLinear/DequantizeLinear pairs).

Two graphs, one per kind of integer kernel (:data:`TARGETS`), because no single QDQ graph is both legal for
TensorRT and fast on ONNX Runtime CPU (measured: benchmarks/bench_int8.py, results/int8.md):

- ``"tensorrt"`` -> ``model_int8.onnx``: TensorRT 10 and 11 build it as an explicitly quantised network (the
  scales come from the graph, no calibrator on the device); ONNX Runtime CUDA runs it too. TensorRT accepts
  only symmetric INT8 (zero point 0) for activations and weights, so both are symmetric, weights per output
  channel; the stem and depthwise convolutions stay float (:func:`float_convolutions`). On ONNX Runtime CPU
  this graph is slower than float32: its float depthwise convolutions break the integer chains into
  Quantize/Dequantize pairs and layout reorders.
- ``"cpu"`` -> ``model_int8_cpu.onnx``: ONNX Runtime's x86 fast path, U8S8 (asymmetric uint8 activations,
  symmetric int8 per-channel weights, VPDPBUSD multiplies u8 x s8). Every convolution is quantised and each
  ReLU6 (Clip) is folded into its convolution's uint8 range, so ONNX Runtime fuses the whole backbone into one
  QLinearConv/QLinearAdd chain with Quantize/Dequantize only at the input and the two feature taps.
  TensorRT cannot build it (non-zero zero points).

Calibration is ONNX Runtime's static quantiser (``onnxruntime.quantization.quantize_static``) on training
images prepared by the runtime's own preprocessing (the exporter passes them through ``to_tensor``), with
the activation ranges read by one of :data:`CALIBRATIONS`. The interface stays the float32 graph's:
``images [B, 3, H, W]`` float32 -> ``embeddings [B, h*w, D]`` float32. No torch here.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pcedge.runtime.files import write_bytes_atomic

#: Activation-range methods (``--int8-calibration``), ONNX Runtime's ``CalibrationMethod`` names.
CALIBRATIONS = ("minmax", "entropy", "percentile")
#: Chosen by benchmarks/bench_int8.py (results/int8.md): see README, "INT8".
DEFAULT_CALIBRATION = "percentile"
#: Calibration images: enough for stable activation ranges.
DEFAULT_CALIBRATION_IMAGES = 32
#: Images per calibration pass. ONNX Runtime's histogram calibrators hold every intermediate tensor of a
#: pass in memory (measured: +1.9 GB for 32 images at 224 x 224 in one pass, EfficientNet-Lite0); their
#: histograms accumulate across passes, so memory is bounded by this chunk, not by the image count.
CALIBRATION_CHUNK = 4
#: Operators given INT8 inputs: the backbone's convolutions and the residual Adds between them. The
#: patch-aggregation tail (AveragePool, Resize, Concat) stays float: it averages and interpolates the very
#: features the memory bank is compared with, and it is about 2 % of the graph's time (results/int8.md,
#: ONNX Runtime's profile: 0.1 of 4.5 ms), so rounding it could only cost accuracy for no speed.
QUANTISED_OPS = ("Conv", "Add")
#: What each INT8 graph is for: "tensorrt" (symmetric QDQ; TensorRT, ONNX Runtime CUDA) or "cpu" (U8S8 QDQ
#: for ONNX Runtime's x86 integer kernels).
TARGETS = ("tensorrt", "cpu")


@dataclass(frozen=True)
class QuantRecipe:
    """How one target's graph is quantised (ONNX Runtime quantiser settings)."""

    ops: tuple[str, ...]  # op types given INT8 inputs
    symmetric_activations: bool  # zero point 0 (TensorRT) or the calibrated [min, max] (uint8, ORT CPU)
    keep_float_convs: bool  # leave the stem and depthwise convolutions float (float_convolutions)
    description: str  # for the manifest and reports
    per_channel: bool = True  # weight scales per output channel (False: one per tensor)


RECIPES = {
    "tensorrt": QuantRecipe(QUANTISED_OPS, symmetric_activations=True, keep_float_convs=True,
                            description="S8S8 symmetric, per-channel weights, stem and depthwise convs float"),
    # Clip is quantised too: with asymmetric activations the quantiser drops each ReLU6 and gives its
    # convolution the ReLU6 output's [0, 6] range, so no Dequantize/Quantize pair sits between two
    # convolutions (quantising Conv and Add only left 23 such pairs, 2.2 of 5.2 ms in ORT's profile). The
    # uint8 range then spends all 256 levels on 0..6, which is what lets the depthwise convolutions quantise:
    # the symmetric int8 graph with every convolution quantised lost 8-12 image-AUROC points, this one none.
    "cpu": QuantRecipe(("Conv", "Add", "Clip"), symmetric_activations=False, keep_float_convs=False,
                       description="U8S8 asymmetric uint8 activations, per-channel weights, every conv quantised"),
}


@dataclass
class Int8Settings:
    """How ``model_int8.onnx`` is written (recorded in the manifest's ``model.int8``)."""

    calibration: str = DEFAULT_CALIBRATION  # one of CALIBRATIONS
    n_images: int = DEFAULT_CALIBRATION_IMAGES  # training images the activation ranges are read from
    target: str = "tensorrt"  # one of TARGETS: which recipe (RECIPES)
    # Override the recipe's placement: False quantises every convolution of the "tensorrt" graph
    # (benchmarks/bench_int8.py measures that variant: less accurate, and not faster on ORT CPU).
    keep_float_convs: bool | None = None
    # A recipe other than the target's (benchmarks/bench_int8.py's ablations); None: RECIPES[target].
    recipe_override: QuantRecipe | None = None

    @property
    def recipe(self) -> QuantRecipe:
        return self.recipe_override or RECIPES[self.target]

    @property
    def float_convs_kept(self) -> bool:
        return self.recipe.keep_float_convs if self.keep_float_convs is None else self.keep_float_convs


def float_convolutions(model) -> list[str]:
    """Names of the convolutions left float: the stem (first) convolution and every grouped (depthwise) one.

    Measured with EfficientNet-Lite0 (benchmarks/bench_int8.py, results/int8.md): quantising every
    convolution moved the test set's good-image scores by 23-25 % (median) and cost 8.3 (BSData) and 11.9
    (DeepPCB) image AUROC points; leaving these float brings the change to about 1 % with the default
    calibration's AUROC change inside its 95 % interval around 0. A 3x3 depthwise filter sums only 9 products per output, so one
    per-tensor activation scale shared by channels of very different ranges rounds much of it away; the
    pointwise (1x1) convolutions hold most of the FLOPs and quantise well.
    """
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    grouped = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    stem = [convs[0].name] if convs and convs[0].name not in grouped else []
    return stem + grouped


class _ImageReader:
    """``onnxruntime.quantization.CalibrationDataReader``: one image ``[1, 3, H, W]`` per call."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.input_name = input_name
        self.images = images
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.images.shape[0]:
            return None
        batch = np.ascontiguousarray(self.images[self.position : self.position + 1], dtype=np.float32)
        self.position += 1
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position = 0


def write_int8_graph(src: str | os.PathLike[str], dst: str | os.PathLike[str], images: np.ndarray,
                     settings: Int8Settings) -> int:
    """Quantise float32 graph ``src`` to a QDQ graph at ``dst`` (atomically), calibrated on ``images``
    ``[n, 3, H, W]`` float32 (the runtime's network inputs). Returns how many convolutions stayed float."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if settings.target not in TARGETS:
        raise ValueError(f"INT8 target {settings.target!r}: choose one of {', '.join(TARGETS)}")
    if settings.calibration not in CALIBRATIONS:
        raise ValueError(f"--int8-calibration {settings.calibration!r}: choose one of {', '.join(CALIBRATIONS)}")
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"INT8 calibration needs images [n, 3, H, W] with n >= 1, got {list(images.shape)}")
    src, dst = Path(src), Path(dst)
    reference = onnx.load(str(src), load_external_data=False)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        # Shape inference and ONNX Runtime's basic graph fusions first, as the quantiser's docs advise:
        # the quantiser then sees one Conv per convolution with known shapes.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantised = Path(work) / "model_int8.onnx"
        keep_float = (float_convolutions(onnx.load(str(prepared), load_external_data=False))
                      if settings.float_convs_kept else [])
        readers = [_ImageReader(reference.graph.input[0].name, images[i : i + CALIBRATION_CHUNK])
                   for i in range(0, images.shape[0], CALIBRATION_CHUNK)]
        # The histogram calibrators print progress with print(); the exporter's stdout is its report.
        with contextlib.redirect_stdout(io.StringIO()):
            _quantise(prepared, quantised, readers, settings, keep_float)
        model = onnx.load(str(quantised))
        onnx.checker.check_model(model, full_check=True)
        _check_interface(reference, model, src)
        write_bytes_atomic(dst, model.SerializeToString())  # a graph under 2 GB: one protobuf, no external data
    return len(keep_float)


#: Histogram calibrators' settings, per method. ONNX Runtime's entropy default (128 bins for 128 quantised
#: bins) leaves the KL search a single candidate, the full range, i.e. MinMax again (measured: identical
#: scales on BSData); TensorRT's entropy calibrator histograms 2048 bins into 128, as here. The percentile
#: settings are ONNX Runtime's defaults (2048 bins, 99.999th percentile; of |x| for the symmetric graph).
_CALIBRATOR_OPTIONS = {
    "minmax": {},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}


def _quantise(prepared: Path, quantised: Path, readers: list[_ImageReader], settings: Int8Settings,
              keep_float: list[str]) -> None:
    """Read the activation ranges with ``settings.calibration``, then ONNX Runtime's static QDQ quantiser with
    ``settings.target``'s recipe (:data:`RECIPES`)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        create_calibrator,
        quantize_static,
        save_tensors_data,
    )

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.calibration]
    # The calibrator is run here rather than inside quantize_static, whose options cannot set the
    # histogram's bins; its ranges reach the quantiser through ONNX Runtime's calibration cache file.
    recipe = settings.recipe
    calibrator = create_calibrator(prepared, list(recipe.ops), augmented_model_path=str(quantised.parent / "augmented.onnx"),
                                   calibrate_method=method,
                                   extra_options={**_CALIBRATOR_OPTIONS[settings.calibration],
                                                  "symmetric": recipe.symmetric_activations})
    for reader in readers:  # one pass per chunk: MinMax merges ranges, the histograms accumulate
        calibrator.collect_data(reader)
    cache = quantised.parent / "ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    del calibrator
    if recipe.symmetric_activations:
        activation_type = QuantType.QInt8
        extra_options = {
            # TensorRT's explicit quantisation: zero point 0 for activations and weights.
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            # Biases stay float32: TensorRT fuses them into the INT8 convolution itself and has no
            # int32 DequantizeLinear; ONNX Runtime's CPU kernels accept either.
            "QuantizeBias": False,
            # A symmetric range cannot clip at 0, so a Clip/Relu after a Conv must stay in the graph
            # (onnxruntime issue 11660: removing it under symmetric activations changes results).
            "QDQKeepRemovableActivations": True,
        }
    else:
        # ONNX Runtime's x86 guidance: uint8 activations x int8 weights (U8S8) is its integer kernels' fast path.
        activation_type = QuantType.QUInt8
        extra_options = {
            "ActivationSymmetric": False,
            "WeightSymmetric": True,
            # int32 biases: QLinearConv takes them as they are.
            "QuantizeBias": True,
            # The uint8 range of a ReLU6 output is [0, 6] exactly, so the Clip is redundant: dropped, its
            # convolution's output is quantised with the Clip's range and the convolutions chain in integers.
            "QDQKeepRemovableActivations": False,
        }
    quantize_static(
        str(prepared), str(quantised), None,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(recipe.ops),
        # Both recipes use per-channel weights: measured, the "cpu" graph with per-tensor weights moved BSData's good-image
        # scores by 48 % (median) and cost 25 image-AUROC points (a depthwise filter per channel cannot share
        # one scale).
        per_channel=recipe.per_channel,
        activation_type=activation_type,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
        nodes_to_exclude=keep_float,
        calibration_cache_path=str(cache),
        extra_options=extra_options,
    )


def _check_interface(reference, model, src: Path) -> None:
    """The INT8 graph must keep ``src``'s input and output names, float32 types and shapes."""

    def signature(graph):
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
                for v in (*graph.input, *graph.output)]

    if signature(model.graph) != signature(reference.graph):
        raise ValueError(f"{src}: the quantised graph's interface {signature(model.graph)} differs from the float32 "
                         f"graph's {signature(reference.graph)}")


def count_quantised(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{"QuantizeLinear": n, "DequantizeLinear": m}`` in the graph at ``path`` (for the manifest and tests)."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return {op: sum(1 for n in nodes if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
