"""PatchCore's locally aware patch features as one module: images -> patch embeddings.

Roth et al. 2022, "Towards Total Recall in Industrial Anomaly Detection", §3.1: a patch feature at
position (h, w) of feature hierarchy level j is the average over its neighbourhood
N_p^(h,w) (Eq. 1, neighbourhood size p = 3) of the backbone features phi_{i,j} (Eq. 2, f_agg is average
pooling). Levels j = 2 and 3 (stride 8 and 16) are combined by upsampling level 3 to level 2's grid and
concatenating channels. The neighbourhood of a border patch reaches past the feature map; ``border``
says what fills it (``BORDERS``). The paper's code (patchcore-inspection unfolds with zero padding and
averages all p^2 values) and anomalib (``AvgPool2d(3, 1, 1)``) count zeros, which shrinks border features
towards the origin. pcedge defaults to the same (results/border.md measured the alternatives). The optional projection to ``D`` channels is adaptive average pooling over the
channel axis (as in the reference implementation), written as a constant matrix so that it exports as
one MatMul.

This module *is* the ONNX graph: the memory bank and nearest-neighbour search stay outside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone

#: Output grid stride in input pixels (the stride-8 tap's grid).
STRIDE = 8
#: Input sides must be multiples of this (the stride-16 map must cover the stride-8 grid exactly 2:1).
SIDE_MULTIPLE = 16
#: p in the paper's Eq. 1: the neighbourhood N_p is p x p.
NEIGHBOURHOOD = 3
#: What a border patch's 3x3 neighbourhood averages where it leaves the feature map:
#: "zero"    zero padding, counted in the mean (divide by p^2 everywhere): the paper's code and anomalib;
#: "mean"    the mean of the real neighbours only (6 at an edge, 4 at a corner): pcedge 0.1's behaviour;
#: "reflect" the feature map reflected at its edge (a border patch sees mirrored real neighbours).
BORDERS = ("zero", "mean", "reflect")
DEFAULT_BORDER = "zero"


def adaptive_pool_matrix(channels: int, dim: int) -> torch.Tensor:
    """``[C, D]`` matrix ``P`` such that ``x @ P == adaptive_avg_pool1d(x, D)`` for ``x`` of shape ``[..., C]``.

    Output bin ``i`` averages channels ``floor(i*C/D)`` to ``ceil((i+1)*C/D) - 1`` (PyTorch's bins; they
    overlap when ``D`` does not divide ``C``).
    """
    if not 0 < dim <= channels:
        raise ValueError(f"projection_dim must be in 1..{channels} (the backbone's channel count), got {dim}")
    matrix = torch.zeros(channels, dim, dtype=torch.float32)
    for i in range(dim):
        start = (i * channels) // dim
        end = -((-(i + 1) * channels) // dim)  # ceil((i + 1) * C / D)
        matrix[start:end, i] = 1.0 / (end - start)
    return matrix


class PatchEmbedder(nn.Module):
    """Images ``[B, 3, H, W]`` float32 RGB in [0, 1] -> patch embeddings ``[B, h*w, D]`` float32.

    ``h, w = H/8, W/8``; rows are in row-major grid order (index ``y * w + x``). ``D`` is the sum of the
    backbone's tap channels, or ``projection_dim``. Inference only: BatchNorm uses running statistics.
    """

    def __init__(self, backbone: Backbone, projection_dim: int | None = None, border: str = DEFAULT_BORDER):
        super().__init__()
        if border not in BORDERS:
            raise ValueError(f"border {border!r}: expected one of {', '.join(BORDERS)}")
        if list(backbone.strides) != [STRIDE, 2 * STRIDE]:
            raise ValueError(f"{backbone.name}: expected taps at strides [8, 16], got {backbone.strides}")
        self.backbone = backbone
        # Eq. 1-2: f_agg = average over the p x p neighbourhood N_p, same-size output; ``border`` fills N_p
        # where it leaves the map (see BORDERS).
        self.border = border
        pad = NEIGHBOURHOOD // 2
        if border == "reflect":
            self.aggregate = nn.Sequential(nn.ReflectionPad2d(pad), nn.AvgPool2d(NEIGHBOURHOOD, stride=1, padding=0))
        else:
            self.aggregate = nn.AvgPool2d(NEIGHBOURHOOD, stride=1, padding=pad, count_include_pad=border == "zero")
        self.channels = sum(backbone.channels)
        self.projection_dim = projection_dim
        if projection_dim is not None:
            self.register_buffer("projection", adaptive_pool_matrix(self.channels, projection_dim))
        else:
            self.projection = None
        self.eval()

    @property
    def dim(self) -> int:
        """D, the embedding length."""
        return self.projection_dim if self.projection_dim is not None else self.channels

    @property
    def stride(self) -> int:
        return STRIDE

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` patch grid for an ``height x width`` input; ValueError unless both are multiples of 16."""
        if height % SIDE_MULTIPLE or width % SIDE_MULTIPLE or height <= 0 or width <= 0:
            raise ValueError(
                f"input size {height}x{width}: both sides must be positive multiples of {SIDE_MULTIPLE} "
                f"(the stride-16 feature map must align with the stride-8 patch grid), e.g. "
                f"{max(SIDE_MULTIPLE, round(height / SIDE_MULTIPLE) * SIDE_MULTIPLE)}x"
                f"{max(SIDE_MULTIPLE, round(width / SIDE_MULTIPLE) * SIDE_MULTIPLE)}"
            )
        return height // STRIDE, width // STRIDE

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {list(images.shape)}")
        h, w = self.grid(int(images.shape[2]), int(images.shape[3]))
        level2, level3 = self.backbone(images)  # [B, C2, h, w], [B, C3, h/2, w/2]
        if tuple(level2.shape[-2:]) != (h, w) or tuple(level3.shape[-2:]) != (h // 2, w // 2):
            raise ValueError(
                f"{self.backbone.name}: feature maps {list(level2.shape[-2:])} and {list(level3.shape[-2:])} "
                f"do not form the {h}x{w} grid at strides 8 and 16"
            )
        level2 = self.aggregate(level2)
        level3 = self.aggregate(level3)
        # Bring level 3 to level 2's grid (bilinear, half-pixel centres) before concatenating. A constant
        # scale factor (exactly 2, checked above) exports as Resize with constant scales: no Shape op.
        level3 = F.interpolate(level3, scale_factor=2.0, mode="bilinear", align_corners=False)
        features = torch.cat([level2, level3], dim=1)  # [B, C, h, w]
        # flatten/transpose instead of reshape(B, ...): B stays symbolic in the exported graph.
        patches = features.flatten(2).transpose(1, 2)  # [B, h*w, C]
        if self.projection is not None:
            patches = patches @ self.projection  # [B, h*w, D]
        return patches
