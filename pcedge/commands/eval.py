"""``pcedge eval``: accuracy of a bundle on a labelled category (MVTec AD layout); the work is done by
:mod:`pcedge.runtime.evaluation.accuracy`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pcedge.commands.common import add_detector_arguments, check_outputs, int_at_least, open_detector, os_error_text, q
from pcedge.runtime.evaluation.accuracy import (DEFAULT_PIXEL_SIZE, AccuracyAccumulator, EvalReport, coverage_warning,
                                                evaluate, format_report)
from pcedge.runtime.evaluation.dataset import DatasetError, load_category
from pcedge.runtime.evaluation.metrics import MetricError
from pcedge.runtime.files import write_json
from pcedge.runtime.preprocess import ImageError

HELP = "accuracy on a labelled category folder (MVTec layout): image/pixel AUROC, AUPRO, F1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (NAME.pcedge)")
    parser.add_argument("--data", type=Path, required=True, metavar="CATEGORY_DIR",
                        help="category folder: test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the full report here")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="write ROC/PRO curves, the score histogram, overlays of the worst false positives and "
                             "negatives and an index.html into DIR (new, empty or a previous report; needs "
                             "pip install 'pcedge[eval]')")
    add_detector_arguments(parser)
    parser.add_argument("--batch", type=int_at_least("--batch", 1), default=8, help="images per backbone call (default 8)")
    parser.add_argument("--pixel-size", type=int_at_least("--pixel-size", 0), default=DEFAULT_PIXEL_SIZE, metavar="N",
                        help=f"pixel metrics at the mask resolution scaled so the longer side is <= N "
                             f"(default {DEFAULT_PIXEL_SIZE}; 0 = the masks' own resolution)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    if not check_outputs("eval", files={"--json": args.json}):
        return 2
    try:
        category = load_category(args.data)
    except DatasetError as exc:
        print(f"pcedge eval: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # a folder of the category that cannot be listed
        print(f"pcedge eval: {os_error_text(exc)}", file=sys.stderr)
        return 2
    if args.report is not None:
        from pcedge.runtime.evaluation.report import ReportError, load_pyplot, prepare_folder

        try:
            load_pyplot()  # fail before the evaluation when matplotlib is missing
            prepare_folder(args.report)
        except (ReportError, OSError) as exc:
            print(f"pcedge eval: --report {args.report}: {exc}", file=sys.stderr)
            return 2
    detector = open_detector(args, "eval")
    if detector is None:
        return 2
    description, threshold = detector.description, detector.threshold
    counts = ", ".join(f"{label} {category.count(label)}" for label in category.defect_types)
    print(f"pcedge eval: {category.name}: {category.count('good')} good, {counts}; {description}",
          file=sys.stderr)
    t0 = time.perf_counter()
    files = None
    try:
        with detector:
            acc = AccuracyAccumulator(args.pixel_size)
            metrics, coverage, mean_ms, records = evaluate(detector, category, args.pixel_size, args.batch,
                                                           progress=not args.quiet, accumulator=acc)
            report = EvalReport(
                bundle=str(args.bundle), data=str(args.data), category=category.name, backend=description,
                threshold=threshold, metrics=metrics, coverage=coverage, mean_ms_per_image=mean_ms,
                seconds=time.perf_counter() - t0, images=records,
            )
            if args.report is not None:
                from pcedge.runtime.evaluation.report import write_report

                files = write_report(args.report, report, acc, detector, category)
    except (ImageError, DatasetError, MetricError, OSError) as exc:
        print(f"pcedge eval: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    warning = coverage_warning(coverage)
    if warning:
        print(warning, file=sys.stderr)
    if args.json:
        try:
            write_json(args.json, report)
        except OSError as exc:  # checked up front; the disk can still fill up or the folder vanish
            print(f"pcedge eval: --json {args.json}: not written ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    if files is not None:
        print(f"wrote {files.index} ({len(files.figures)} figures, {len(files.overlays)} overlays)")
    print(f"next: pcedge predict {q(args.bundle)} {q(category.root / 'test')} --save-maps maps/   (look at the anomaly maps)")
    return 0
