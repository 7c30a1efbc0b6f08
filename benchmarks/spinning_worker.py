"""One process of ``bench_spinning.py``: ``DetectorOptions.ort_spinning`` off / on / auto side by side.

Opens one detector per mode on the same bundle and precision (ONNX Runtime CPU, the runtime's defaults
otherwise), warms each up, then runs them in alternating blocks of ``--block`` frames (the order rotates
from block to block) until each has run ``--repeats`` timed frames. The modes thus share the same moments
of the machine: a burst of other work, or the competing process ``bench_spinning.py`` starts beside this
one, lands on all of them, which separate processes run one after another cannot promise on a shared
machine. Each detector keeps its own state between its blocks (the governor of "auto" runs continuously,
as with a camera whose frames arrive with gaps). Decoding is excluded, batch 1, as in ``latency_worker.py``
(whose import helpers this uses: pcedge comes from ``--tree``). Output: one JSON object (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency_worker import STAGES, git_head, import_pcedge_from, percentiles, spin_record  # noqa: E402

MODES = {"off": False, "on": True, "auto": "auto"}


def rss_mb() -> float | None:
    """This process's resident memory (VmRSS, Linux), MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, required=True, help="source tree to import pcedge from")
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout category: test/ frames")
    parser.add_argument("--frames", type=int, default=80, help="test frames decoded once and cycled through")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--index", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    parser.add_argument("--repeats", type=int, default=300, help="timed frames per mode")
    parser.add_argument("--block", type=int, default=30, help="frames per mode before the next mode runs")
    parser.add_argument("--warmup", type=int, default=30, help="untimed frames per mode first")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.block < 1 or args.warmup < 0:
        parser.error("--repeats and --block must be at least 1, --warmup at least 0")

    imported = import_pcedge_from(args.tree)
    from pcedge.runtime.bundle import BundleError
    from pcedge.runtime.detector import Detector, DetectorOptions
    from pcedge.runtime.errors import BackendUnavailable
    from pcedge.runtime.preprocess import list_images, read_image

    record = {"tree": str(args.tree), "git": git_head(args.tree), "imported": imported, "precision": args.precision,
              "index": args.index, "block": args.block, "loadavg_before": list(os.getloadavg())}
    test = args.data / "test"
    paths = sorted(p for d in sorted(test.iterdir()) if d.is_dir() for p in list_images(d))
    frames = [read_image(p) for p in paths[: args.frames]]
    detectors = {}
    record["rss_mb_before_open"] = rss_mb()  # with --modes X alone: the rise is that detector's memory
    try:
        for mode in args.modes:
            options = DetectorOptions(backend="ort-cpu", index=args.index, threads=args.threads,
                                      precision=args.precision,  # "fp32" by name: ort-cpu may default to INT8
                                      ort_spinning=MODES[mode])
            detectors[mode] = Detector.open(args.bundle, options)
    except (BundleError, BackendUnavailable, ValueError) as exc:
        for detector in detectors.values():
            detector.close()
        record.update(status="skipped", reason=f"{type(exc).__name__}: {exc}", loadavg_after=list(os.getloadavg()))
        args.out.write_text(json.dumps(record, indent=1))
        return 0
    calls: dict[str, list[float]] = {mode: [] for mode in detectors}
    stages: dict[str, dict[str, list[float]]] = {mode: {s: [] for s in STAGES} for mode in detectors}
    block_medians: dict[str, list[float]] = {mode: [] for mode in detectors}
    try:
        for mode, detector in detectors.items():
            for i in range(args.warmup):
                detector.run_frames([frames[i % len(frames)]])
        modes = list(detectors)
        for number in range(-(-args.repeats // args.block)):
            order = modes[number % len(modes):] + modes[: number % len(modes)]
            for mode in order:
                detector, block = detectors[mode], []
                for i in range(min(args.block, args.repeats - number * args.block)):
                    started = time.perf_counter()
                    result = detector.run_frames([frames[(number * args.block + i) % len(frames)]])[0]
                    block.append((time.perf_counter() - started) * 1e3)
                    for name in STAGES:
                        stages[mode][name].append(getattr(result.timings, f"{name}_ms"))
                calls[mode] += block
                block_medians[mode].append(sorted(block)[len(block) // 2])
        record.update(status="ran", frames=len(frames), modes={
            mode: {"description": detector.description, "per_image_ms": percentiles(calls[mode]),
                   "stages_ms": {name: percentiles(v) for name, v in stages[mode].items()},
                   "block_medians_ms": block_medians[mode], "spin": spin_record(detector)}
            for mode, detector in detectors.items()}, loadavg_after=list(os.getloadavg()), rss_mb_after=rss_mb())
    finally:
        for detector in detectors.values():
            detector.close()
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
