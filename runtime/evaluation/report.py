"""``pcedge eval --report DIR``: the pictures a person looks at before trusting a model.

Writes into ``DIR``: ``roc.png`` (image-level ROC with the calibrated threshold's operating point),
``pro.png`` (per-region overlap against pixel FPR up to the AUPRO limit), ``scores.png`` (histogram of
good and defective image scores with the threshold drawn), ``overlays/fp_*.png`` and ``overlays/fn_*.png``
(the highest-scoring good images and the lowest-scoring defective ones, anomaly map over the frame, ground
truth outlined in green) and ``index.html`` showing all of them beside the figures.

matplotlib (the ``eval`` extra) is imported here only; the Agg backend needs no display. Every file is
written under a temporary name and renamed. ``DIR`` must be new, empty, or a previous report (marked by
``.pcedge-report``): a report never overwrites files it did not write.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..overlay import render_overlay, write_image
from ..preprocess import read_image
from .accuracy import AccuracyAccumulator, EvalReport, ImageRecord
from .dataset import Category
from .metrics import pro_curve, roc_curve

MARKER = ".pcedge-report"
GROUND_TRUTH_BGR = (60, 220, 60)


class ReportError(ValueError):
    """The report cannot be written (the folder, or matplotlib missing); the message names what to do."""


@dataclass
class ReportFiles:
    folder: Path
    index: Path
    figures: list[Path] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)


def prepare_folder(folder: Path) -> None:
    """Create ``folder``, or accept it when empty or a previous report; refuse anything else."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"{folder}: exists and is not a directory")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise ReportError(f"{folder}: not empty and not a previous pcedge report; choose a new folder")
    (folder / "overlays").mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("written by pcedge eval --report\n")


def load_pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ReportError("--report needs matplotlib: pip install 'pcedge[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def figure_roc(plt, records: list[ImageRecord], threshold: float, path: Path, auroc: float) -> Path:
    labels = np.array([r.is_anomalous for r in records])
    scores = np.array([r.score for r in records])
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"image AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    flagged = scores > threshold
    op_fpr, op_tpr = flagged[~labels].mean(), flagged[labels].mean()
    ax.plot([op_fpr], [op_tpr], "o", color="crimson", label=f"threshold: FPR {op_fpr:.2f}, recall {op_tpr:.2f}")
    ax.set(xlabel="false-positive rate (good images flagged)", ylabel="true-positive rate (defects flagged)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="Image-level ROC")
    ax.legend(loc="lower right", fontsize=8)
    path = _save(fig, path)
    plt.close(fig)
    return path


def figure_pro(plt, acc: AccuracyAccumulator, limit: float, aupro: float, path: Path) -> Path:
    curve = pro_curve(acc.masks, acc.maps, limit)
    # Each segment runs from (fpr[i], pro_before[i]) to (fpr[i + 1], pro_at[i + 1]); vertical steps between.
    xs = np.repeat(curve.fpr, 2)[1:-1]
    ys = np.empty_like(xs)
    ys[0::2], ys[1::2] = curve.pro_before[:-1], curve.pro_at[1:]
    xs = np.concatenate(([0.0], xs))
    ys = np.concatenate(([0.0], ys))
    keep = xs <= limit
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot(xs[keep], ys[keep], label=f"AUPRO@{limit:g} {aupro:.3f}")
    ax.set(xlabel="pixel false-positive rate", ylabel="per-region overlap", xlim=(0, limit), ylim=(-0.01, 1.01),
           title=f"PRO curve ({curve.n_regions} defect regions)")
    ax.legend(loc="lower right", fontsize=8)
    path = _save(fig, path)
    plt.close(fig)
    return path


def figure_scores(plt, records: list[ImageRecord], threshold: float, path: Path) -> Path:
    good = np.array([r.score for r in records if not r.is_anomalous])
    bad = np.array([r.score for r in records if r.is_anomalous])
    bins = np.linspace(min(good.min(), bad.min(), threshold), max(good.max(), bad.max(), threshold), 31)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.hist(good, bins=bins, alpha=0.6, color="seagreen", label=f"good ({good.size})")
    ax.hist(bad, bins=bins, alpha=0.6, color="crimson", label=f"defective ({bad.size})")
    ax.axvline(threshold, color="black", lw=1.5, ls="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="image score (Eq. 7)", ylabel="images", title="Image scores")
    ax.legend(fontsize=8)
    path = _save(fig, path)
    plt.close(fig)
    return path


def worst_cases(records: list[ImageRecord], threshold: float, n: int) -> tuple[list[int], list[int]]:
    """Indices of the ``n`` highest-scoring good images and the ``n`` lowest-scoring defective ones."""
    good = [i for i, r in enumerate(records) if not r.is_anomalous]
    bad = [i for i, r in enumerate(records) if r.is_anomalous]
    fp = sorted(good, key=lambda i: -records[i].score)[:n]
    fn = sorted(bad, key=lambda i: records[i].score)[:n]
    return fp, fn


def overlay_with_truth(detector, category: Category, record: ImageRecord) -> np.ndarray:
    """The detector's overlay of one test image, with its ground-truth defect outlined (BGR uint8)."""
    frame = read_image(record.path)
    result = detector(frame)
    canvas = render_overlay(frame, result, detector.normalise_map(result.anomaly_map))
    item = next((t for t in category.test if str(t.path) == record.path), None)
    if item is not None and item.mask_path is not None:
        mask = cv2.imread(str(item.mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is not None and mask.shape == canvas.shape[:2]:
            contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(canvas, contours, -1, GROUND_TRUTH_BGR, max(1, round(max(canvas.shape[:2]) / 300)))
    return canvas


def write_report(folder: Path, report: EvalReport, acc: AccuracyAccumulator, detector, category: Category,
                 n_worst: int = 4) -> ReportFiles:
    """All figures, overlays and ``index.html`` for one evaluation (see the module docstring)."""
    plt = load_pyplot()
    folder = Path(folder)
    prepare_folder(folder)
    m = report.metrics
    files = ReportFiles(folder=folder, index=folder / "index.html")
    files.figures.append(figure_roc(plt, report.images, report.threshold, folder / "roc.png", m.image_auroc))
    files.figures.append(figure_pro(plt, acc, m.aupro_fpr_limit, m.aupro, folder / "pro.png"))
    files.figures.append(figure_scores(plt, report.images, report.threshold, folder / "scores.png"))
    fp, fn = worst_cases(report.images, report.threshold, n_worst)
    captions = []
    for kind, ids in (("fp", fp), ("fn", fn)):
        for rank, i in enumerate(ids):
            record = report.images[i]
            path = folder / "overlays" / f"{kind}_{rank + 1}.png"
            write_image(path, overlay_with_truth(detector, category, record))
            files.overlays.append(path)
            verdict = "flagged" if record.score > report.threshold else "passed"
            captions.append((kind, path, f"{Path(record.path).name} ({record.label}): score {record.score:.3f}, "
                                         f"{verdict} at threshold {report.threshold:.3f}"))
    _write_text(files.index, _html(report, captions))
    return files


def _html(report: EvalReport, captions: list[tuple[str, Path, str]]) -> str:
    m = report.metrics
    e = html.escape
    rows = [
        ("images", f"{m.n_good} good, {m.n_anomalous} defective"),
        ("image AUROC", f"{m.image_auroc:.4f}"),
        ("pixel AUROC", f"{m.pixel_auroc:.4f}"),
        (f"AUPRO@{m.aupro_fpr_limit:g}", f"{m.aupro:.4f}"),
        ("image F1-max", f"{m.image_f1_max:.4f}"),
        ("threshold", f"{report.threshold:.4f}"),
    ]
    if m.at_threshold is not None:
        t = m.at_threshold
        rows.append(("at the threshold", f"precision {t.precision:.3f}, recall {t.recall:.3f}, F1 {t.f1:.3f}"))
    table = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)

    def gallery(kind: str, title: str) -> str:
        cells = [f'<figure><img src="overlays/{e(p.name)}" alt="{e(c)}"><figcaption>{e(c)}</figcaption></figure>'
                 for k, p, c in captions if k == kind]
        return f"<h2>{e(title)}</h2>\n<div class=\"gallery\">{''.join(cells) or '<p>none</p>'}</div>"

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>pcedge eval: {e(report.category)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1200px; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 2px 10px; border-bottom: 1px solid #ddd; }}
.figures img {{ max-width: 32%; }} .gallery {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; max-width: 380px; }} figure img {{ max-width: 100%; }} figcaption {{ font-size: 0.85em; }}
</style>
</head>
<body>
<h1>pcedge eval: {e(report.category)}</h1>
<p>Bundle <code>{e(report.bundle)}</code>, data <code>{e(report.data)}</code>; {e(report.backend)}.</p>
<table>
{table}
</table>
<h2>Curves and scores</h2>
<div class="figures">
<img src="roc.png" alt="image-level ROC curve"><img src="pro.png" alt="PRO curve"><img src="scores.png" alt="histogram of image scores">
</div>
{gallery("fp", "Highest-scoring good images (false alarms if above the threshold)")}
{gallery("fn", "Lowest-scoring defective images (missed if below the threshold); ground truth in green")}
</body>
</html>
"""
