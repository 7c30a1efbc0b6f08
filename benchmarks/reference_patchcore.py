"""A plain full-bank PyTorch PatchCore (Roth et al., CVPR 2022): the yardstick for pcedge's coreset and index.

What it checks: that pcedge's speed-ups (greedy coreset, HNSW with re-scoring, the ONNX graph, the runtime
scorer) lose nothing against exhaustive exact search on the same patch features. What it does not check:
the method itself. It shares pcedge's embedder and preprocessing, so a fault there (as pcedge 0.1's border
averaging was) is invisible to it; ``bench_vs_peer.py`` compares pcedge with an independent implementation
(anomalib) for that.

Everything pcedge does for speed is absent here: no coreset (the memory bank ``M`` holds every training
patch), no approximate index (``torch.cdist`` to every memory feature, in float64 so that the expanded
matrix-product form loses nothing to cancellation), no ONNX. What it shares with pcedge is only what
must be identical for a comparison to mean anything: the backbone and the locally aware patch features
(``pcedge.export.embedder.PatchEmbedder``, paper §3.1) and the image geometry
(``pcedge.runtime.preprocess``: the same pixels go in, and maps go back into the original image through
the same :class:`~pcedge.runtime.preprocess.Placement`).

Scoring, paper §3.3, in the paper's symbols:

- patch score: ``s(m_test) = min_{m in M} ||m_test - m||_2``;
- Eq. 6: ``m_test,*, m* = argmax_{m_test in P(x_test)} argmin_{m in M} ||m_test - m||_2``, ``s* = ||m_test,* - m*||_2``;
- Eq. 7: ``s = (1 - exp||m_test,* - m*||_2 / sum_{m in N_b(m*)} exp||m_test,* - m||_2) * s*``, where
  ``N_b(m*)`` are the ``b`` nearest neighbours of ``m*`` in ``M`` (``m*`` itself among them, at distance 0);
- anomaly map: the patch scores on their ``h x w`` grid, upsampled bilinearly to the input size, then a
  Gaussian blur with sigma = 4 (at 224 px; scaled with the input size as pcedge does), kernel
  ``2 * round(4 sigma) + 1``, reflect padding.

Speed is deliberately not a goal: the fixture takes seconds, a full category minutes.

    python benchmarks/reference_patchcore.py --data fixtures/ball_screw_drive
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pcedge.export.backbones import build_backbone
from pcedge.export.embedder import PatchEmbedder
from pcedge.runtime.bundle import Geometry
from pcedge.runtime.preprocess import Placement, fit_geometry, read_image, to_tensor


@dataclass
class ReferenceConfig:
    backbone: str = "efficientnet_lite0"
    weights: str | None = None  # a state-dict file; None: the backbone's pretrained default
    random_weights: bool = False
    projection_dim: int | None = None  # as the bundle's model.projection_dim
    geometry: Geometry = field(default_factory=Geometry)
    reweight: bool = True  # Eq. 7
    b: int = 9  # |N_b(m*)|
    blur_sigma: float = 4.0  # at blur_reference_size pixels, as in the paper
    blur_reference_size: int = 224
    bank_chunk: int = 16384  # memory features per torch.cdist call (bounds memory only)
    batch_size: int = 8  # images per backbone call


@dataclass
class ReferenceResult:
    score: float  # s, Eq. 7 (s* when re-weighting is off)
    s_star: float  # s*, Eq. 6
    patch_scores: np.ndarray  # [h, w] float64 nearest-neighbour distances
    net_map: np.ndarray  # [H, W] float32 anomaly map on the network input
    anomaly_map: np.ndarray  # [H_orig, W_orig] float32 in the original image, NaN where not seen


def gaussian_kernel_1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of length ``2 * round(4 sigma) + 1``, float64."""
    radius = int(round(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[H, W]`` -> ``[H, W]``: separable Gaussian, reflect padding (mirror without repeating the edge)."""
    g = gaussian_kernel_1d(sigma).to(image.dtype)
    r = (g.numel() - 1) // 2
    x = image[None, None]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1))  # along width
    x = F.conv2d(x, g.view(1, 1, -1, 1))  # along height
    return x[0, 0]


class ReferencePatchCore:
    """Fit on good images (full memory bank), then score test images. See the module docstring."""

    def __init__(self, config: ReferenceConfig):
        self.config = config
        g = config.geometry
        backbone = build_backbone(config.backbone, weights=config.weights, random_weights=config.random_weights,
                                  input_hw=(g.height, g.width))
        self.embedder = PatchEmbedder(backbone, projection_dim=config.projection_dim).eval()
        self.grid = self.embedder.grid(g.height, g.width)
        self.memory_bank: torch.Tensor | None = None  # M, [N, D] float64

    # ------------------------------------------------------------------ features
    def load(self, paths: list[Path]) -> tuple[np.ndarray, list[Placement]]:
        """Files -> network input ``[B, 3, H, W]`` (pcedge's geometry, so the pixels are identical) and placements."""
        fitted = [fit_geometry(read_image(p), self.config.geometry, str(p)) for p in paths]
        return to_tensor([f[0] for f in fitted]), [f[1] for f in fitted]

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        """``[B, 3, H, W]`` -> patch features ``[B, h*w, D]`` float64 (the locally aware features of §3.1)."""
        return self.embedder(torch.from_numpy(images)).to(torch.float64)

    def fit(self, train_paths: list[Path]) -> int:
        """M = every patch feature of every training image (no coreset). Returns |M|."""
        chunks = []
        for start in range(0, len(train_paths), self.config.batch_size):
            images, _ = self.load(train_paths[start : start + self.config.batch_size])
            features = self.embed(images)
            chunks.append(features.reshape(-1, features.shape[-1]))
        self.memory_bank = torch.cat(chunks)
        return self.memory_bank.shape[0]

    # ------------------------------------------------------------------ nearest neighbours
    def distances_to_bank(self, queries: torch.Tensor) -> torch.Tensor:
        """``[Q, D]`` -> ``[Q, N]``: the Euclidean distance from every query to every memory feature."""
        assert self.memory_bank is not None, "fit() first"
        parts = [torch.cdist(queries, self.memory_bank[s : s + self.config.bank_chunk])
                 for s in range(0, self.memory_bank.shape[0], self.config.bank_chunk)]
        return torch.cat(parts, dim=1)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[Q, D]`` -> (distance to the nearest memory feature ``[Q]``, its row in M ``[Q]``).

        The minimum over M, taken chunk by chunk (only one ``[Q, chunk]`` block of distances in memory).
        """
        assert self.memory_bank is not None, "fit() first"
        best = torch.full((queries.shape[0],), torch.inf, dtype=torch.float64)
        best_ids = torch.zeros(queries.shape[0], dtype=torch.int64)
        for start in range(0, self.memory_bank.shape[0], self.config.bank_chunk):
            distances, ids = torch.cdist(queries, self.memory_bank[start : start + self.config.bank_chunk]).min(dim=1)
            closer = distances < best  # strict: the first of equally near features wins, as argmin over M would
            best[closer], best_ids[closer] = distances[closer], ids[closer] + start
        return best, best_ids

    # ------------------------------------------------------------------ scores
    def image_score(self, patches: torch.Tensor, distances: torch.Tensor, nearest_ids: torch.Tensor) -> tuple[float, float]:
        """Eq. 6 and 7 for one image: ``patches [P, D]``, their NN ``distances [P]`` and ``nearest_ids [P]`` -> (s, s*)."""
        star = int(torch.argmax(distances))
        s_star = distances[star]  # s* = ||m_test,* - m*||
        if not self.config.reweight:
            return float(s_star), float(s_star)
        m_test_star = patches[star]  # m_test,*
        m_star = self.memory_bank[nearest_ids[star]]  # m*
        b = min(self.config.b, self.memory_bank.shape[0])
        # N_b(m*): the b memory features nearest to m* (m* itself comes first, at distance 0).
        neighbourhood = torch.topk(self.distances_to_bank(m_star[None])[0], b, largest=False).indices
        to_neighbourhood = torch.linalg.norm(self.memory_bank[neighbourhood] - m_test_star, dim=1)
        weight = 1 - torch.exp(s_star) / torch.exp(to_neighbourhood).sum()
        return float(weight * s_star), float(s_star)

    def anomaly_map(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """``[h, w]`` patch scores -> ``[H, W]``: bilinear upsampling, then the Gaussian blur."""
        g = self.config.geometry
        up = F.interpolate(patch_scores[None, None], size=(g.height, g.width), mode="bilinear", align_corners=False)[0, 0]
        sigma = self.config.blur_sigma * (0.5 * (g.height + g.width)) / self.config.blur_reference_size
        return gaussian_blur(up, sigma)

    def predict(self, paths: list[Path]) -> list[ReferenceResult]:
        out = []
        h, w = self.grid
        for start in range(0, len(paths), self.config.batch_size):
            images, placements = self.load(paths[start : start + self.config.batch_size])
            features = self.embed(images)
            for patches, placement in zip(features, placements):
                distances, ids = self.nearest(patches)
                score, s_star = self.image_score(patches, distances, ids)
                grid = distances.reshape(h, w)
                net_map = self.anomaly_map(grid).to(torch.float32).numpy()
                out.append(ReferenceResult(score, s_star, grid.numpy(), net_map, placement.to_original(net_map)))
        return out


def main(argv: list[str] | None = None) -> int:
    """Fit on ``DATA/train/good``, score ``DATA/test``, print image and pixel AUROC and AUPRO."""
    from pcedge.runtime.evaluation.accuracy import AccuracyAccumulator
    from pcedge.runtime.evaluation.dataset import load_category

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    parser.add_argument("--backbone", default=ReferenceConfig.backbone)
    parser.add_argument("--size", type=int, default=224, help="square input size (stretch geometry)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    category = load_category(args.data, require_train=True)
    model = ReferencePatchCore(ReferenceConfig(backbone=args.backbone, geometry=Geometry(height=args.size, width=args.size)))
    n = model.fit(category.train)
    print(f"memory bank: {n} patch features from {len(category.train)} images")
    acc = AccuracyAccumulator()
    for item, result in zip(category.test, model.predict([i.path for i in category.test])):
        acc.add(item, result.score, result.anomaly_map)
    m = acc.metrics()
    print(f"image AUROC {m.image_auroc:.4f}  pixel AUROC {m.pixel_auroc:.4f}  AUPRO@0.3 {m.aupro:.4f}  "
          f"F1-max {m.image_f1_max:.4f}  ({m.pixel_resolution})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
