"""The demo: the main job on the bundled fixture, end to end.

1. ``pcedge export`` on ``fixtures/ball_screw_drive`` (good images only, the default settings);
2. ``pcedge info`` on the bundle;
3. ``pcedge predict`` on the fixture's test images (good and pitting) with overlays and a JSONL log;
4. image AUROC of those predictions against the folder labels.

Run: ``python -m pcedge.demo [--out DIR] [--data CATEGORY]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import main as pcedge

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcedge.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "fixtures" / "ball_screw_drive")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    args = parser.parse_args(argv)
    from pcedge.runtime.evaluation.metrics import auroc

    bundle = args.out / f"{args.data.name}.pcedge"
    steps = [
        ["export", "--data", str(args.data), "-o", str(bundle), "--force", "--quiet"],
        ["info", str(bundle)],
        ["predict", str(bundle), str(args.data / "test"), "--save-maps", str(args.out / "overlays"),
         "--jsonl", str(args.out / "predictions.jsonl"), "--quiet"],
    ]
    for step in steps:
        print(f"\n$ pcedge {' '.join(step)}", flush=True)
        code = pcedge(step)
        if code != 0:
            print(f"demo: `pcedge {step[0]}` failed with exit status {code}", file=sys.stderr)
            return code
    records = [json.loads(line) for line in (args.out / "predictions.jsonl").read_text().splitlines()]
    labels = [int(Path(r["path"]).parent.name != "good") for r in records]
    scores = [r["score"] for r in records]
    flagged = sum(r["verdict"] == "anomalous" for r in records)
    print(f"\ndemo: image AUROC {auroc(labels, scores):.3f} on {len(records)} test images "
          f"({sum(labels)} defective); {flagged} flagged at the calibrated threshold")
    print(f"demo: overlays in {args.out / 'overlays'}/, bundle in {bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
