"""Detectability at export: synthetic defects of a few sizes in good images the bank has not seen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pcedge.cli import main
from pcedge.export.backbones import build_backbone
from pcedge.export.detectability import measure_detectability, paste_noise_square
from pcedge.export.embedder import PatchEmbedder
from pcedge.export.fit import extract_features, find_good_images
from pcedge.runtime.bundle import Geometry, ScoringSpec
from pcedge.runtime.index import ExactIndex
from pcedge.runtime.preprocess import fit_geometry, read_image, to_tensor
from pcedge.runtime.scoring import Scorer

ROOT = Path(__file__).resolve().parents[1]
BSD = ROOT / "fixtures" / "ball_screw_drive"


def test_noise_square_has_the_asked_side_away_from_the_edge():
    images = np.full((3, 3, 224, 224), 0.5, dtype=np.float32)
    out = paste_noise_square(images, 0.04, np.random.default_rng(0))
    assert np.array_equal(images, np.full_like(images, 0.5))  # the input is not modified
    for image in out:
        changed = np.argwhere((image != 0.5).any(axis=0))
        (y0, x0), (y1, x1) = changed.min(axis=0), changed.max(axis=0)
        assert (y1 - y0 + 1, x1 - x0 + 1) == (9, 9)  # round(0.04 * 224)
        assert min(y0, x0) >= 56 and max(y1, x1) < 224 - 56


def test_large_defects_are_seen_and_tiny_ones_warn():
    """Fixture images: a bank from 24 training images, the 6 others get the defects. A square a quarter of
    the side is flagged everywhere; a 1-pixel square is not seen at 224 px, and the warning suggests --size."""
    torch.set_num_threads(2)
    paths = find_good_images(BSD)
    embedder = PatchEmbedder(build_backbone("efficientnet_lite0")).eval()
    bank, _ = extract_features(embedder, paths[:24], Geometry(), 8, [], progress=False)
    scorer = Scorer(bank, ExactIndex(bank), ExactIndex(bank), ScoringSpec())
    probe = to_tensor([fit_geometry(read_image(p), Geometry())[0] for p in paths[24:]])
    with torch.inference_mode():
        emb = embedder(torch.from_numpy(probe)).numpy()
    clean = np.array([scorer.image_score(emb[b], p).score for b, p in enumerate(scorer.patch_scores(emb))])
    threshold = float(clean.max()) * 1.05  # no clean image flagged
    spec = measure_detectability(embedder, scorer, probe, threshold, "test", sizes=(0.004, 0.25))
    assert spec.n_images == 6 and spec.pixels == [1.0, 56.0] and spec.flagged_without_defect == 0.0
    assert spec.flagged[1] == 1.0 and spec.flagged[0] < 0.5
    assert spec.smallest_seen == 0.25
    assert "0.4 % of the image side (1 px at 224x224)" in spec.warning and "(e.g. --size 14000)" in spec.warning
    assert "synthetic defects flagged by size" in spec.summary()


def test_export_records_detectability_and_info_prints_it(fixture_report, fixture_bundle, capsys):
    d = fixture_report.manifest.detectability
    assert d is not None and d.side_fractions == [0.01, 0.02, 0.04] and len(d.flagged) == 3
    assert d.pixels == [2.0, 4.0, 9.0] and all(0.0 <= r <= 1.0 for r in d.flagged)
    assert 1 <= d.n_images <= 8 and "outside the memory bank" in d.method
    assert main(["info", str(fixture_bundle)]) == 0
    assert "synthetic defects flagged by size" in capsys.readouterr().out
