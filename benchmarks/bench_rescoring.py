"""Does HNSW keep the decisive patch? Image-score error of HNSW alone and with exact re-scoring.

For every test image of a category: the image score with the exact index (the reference), with HNSW at
each ef (no re-scoring), and with HNSW followed by pcedge's exact re-scoring pass. Reports per category and
ef the worst and median relative image-score error, image AUROC (3 decimals), index latency per image,
and how many patches the re-scoring pass touched.

    python benchmarks/bench_rescoring.py [--data DIR ...] [--ef 8 16 32 64] [--out results/rescoring.json]

Bundles are exported with default settings (cached under results/bundles/) unless --bundle is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_DATA = [SHARED / "bsdata" / "ball_screw_drive", SHARED / "deeppcb" / "pcb"]


@dataclass
class Row:
    category: str
    index: str  # "exact", "hnsw", "hnsw+rescore"
    ef: int | None
    worst_rel_error: float
    median_rel_error: float
    image_auroc: float
    index_ms_per_image: float
    rescored_patches_mean: float = 0.0
    rescored_patches_max: int = 0


@dataclass
class Report:
    machine: dict
    bank: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)


def ensure_bundle(data: Path, out_dir: Path, max_train: int | None) -> Path:
    from pcedge.export.fit import ExportConfig, export_bundle

    bundle = out_dir / f"rescoring-{data.name}.pcedge"
    if not bundle.exists():
        config = ExportConfig(data=data, output=bundle, progress=True)
        if max_train:
            # A seeded subset of the good images keeps the export affordable on 2 cores; say so in the JSON.
            import shutil
            import tempfile

            from pcedge.runtime.preprocess import list_images

            paths = list_images(data / "train" / "good")
            keep = np.random.default_rng(0).permutation(len(paths))[:max_train]
            tmp = Path(tempfile.mkdtemp())
            for i in keep:
                os.symlink(paths[i], tmp / paths[i].name)
            config.data = tmp
            try:
                export_bundle(config)
            finally:
                shutil.rmtree(tmp)
        else:
            export_bundle(config)
    return bundle


def test_images(data: Path) -> tuple[list[Path], np.ndarray]:
    paths = sorted(p for p in (data / "test").rglob("*") if p.is_file())
    labels = np.array([p.parent.name != "good" for p in paths], dtype=int)
    return paths, labels


def main(argv: list[str] | None = None) -> int:
    from pcedge.runtime.detector import Detector
    from pcedge.runtime.evaluation.metrics import auroc
    from pcedge.runtime.preprocess import read_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", default=DEFAULT_DATA)
    parser.add_argument("--ef", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--max-train", type=int, default=300, help="good images used for each export")
    parser.add_argument("--max-test", type=int, default=200, help="test images per category (seeded subset)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "rescoring.json")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(machine={"cpus": os.cpu_count(), "load": os.getloadavg()})
    for data in args.data:
        bundle = ensure_bundle(data, args.out.parent / "bundles", args.max_train)
        paths, labels = test_images(data)
        if len(paths) > args.max_test:
            keep = np.sort(np.random.default_rng(0).permutation(len(paths))[: args.max_test])
            paths, labels = [paths[i] for i in keep], labels[keep]
        frames = [read_image(p) for p in paths]
        with Detector.open(bundle, backend="ort-cpu", index="exact", precision="fp32") as det:
            tensors = []
            for i in range(0, len(frames), 8):
                from pcedge.runtime.preprocess import fit_geometry, to_tensor

                fitted = [fit_geometry(f, det.geometry) for f in frames[i : i + 8]]
                tensors.append(det.embed(to_tensor([x[0] for x in fitted])))
            embeddings = np.concatenate(tensors)
            placements = [fit_geometry(f, det.geometry)[1] for f in frames]
            results = [det.score_embeddings(embeddings[i : i + 1], placements[i : i + 1])[0] for i in range(len(frames))]
            ref = np.array([r.score for r in results])
            exact_ms = float(np.mean([r.timings.index_ms for r in results]))
            report.bank[data.name] = {"n": int(det.bank.shape[0]), "dim": int(det.bank.shape[1]),
                                      "test_images": len(paths), "defective": int(labels.sum())}
            report.rows.append(Row(data.name, "exact", None, 0.0, 0.0, round(auroc(labels, ref), 3), exact_ms))
        for ef in args.ef:
            for rescore in (False, True):
                with Detector.open(bundle, backend="ort-cpu", index="hnsw", ef=ef, rescore=rescore, precision="fp32") as det:
                    rows, ms, rescored = [], 0.0, []
                    for i in range(len(frames)):
                        r = det.score_embeddings(embeddings[i : i + 1], placements[i : i + 1])[0]
                        ms += r.timings.index_ms
                        rows.append(r.score)
                        rescored.append(r.n_rescored)
                    scores = np.array(rows)
                rel = np.abs(scores - ref) / ref
                row = Row(data.name, "hnsw+rescore" if rescore else "hnsw", ef, float(rel.max()), float(np.median(rel)),
                          round(auroc(labels, scores), 3), ms / len(frames), float(np.mean(rescored)), int(max(rescored)))
                report.rows.append(row)
                print(f"{row.category:18s} {row.index:13s} ef {ef:4d}  worst {row.worst_rel_error:8.2e}  "
                      f"median {row.median_rel_error:8.2e}  AUROC {row.image_auroc:.3f}  index {row.index_ms_per_image:6.2f} ms  "
                      f"rescored {row.rescored_patches_mean:5.1f} (max {row.rescored_patches_max})", flush=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    from pcedge.runtime.files import to_jsonable  # NaN -> null: strict JSON
    tmp.write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
