"""End-to-end latency per image, today's code beside a baseline ref, FP32 and INT8: the target is at most
6 ms median (batch 1, decode excluded) for the CPU default path.

Setup: a bundle exported with DEFAULT settings from ``/work/shared/data/bsdata/ball_screw_drive`` (cached
under ``results/bundles/``), ONNX Runtime CPU with the runtime's defaults, index ``auto``, batch 1. Frames:
the category's test images (good and pitting, 1130x460), decoded once before timing; everything else
(preprocess, backbone, index search with exact re-scoring, Eq. 7, anomaly map in the original image) is
timed, per stage (``Result.timings``) and as the wall time of each ``Detector.run_frames`` call.

Rows (``--rows``):
- ``baseline-fp32``: the code at ``--baseline`` (default: where this branch left ``main``, ``git merge-base
  HEAD main``; on ``main`` itself pass the commit to compare with), checked out into a temporary ``git
  worktree`` (removed afterwards);
- ``current-default``: this checkout with ``DetectorOptions()``'s precision (nothing asked: ort-cpu runs the
  bundle's CPU INT8 graph when it ships one with its own threshold, else float32; the row's description
  names the graph) -- the CPU default path the target is about;
- ``current-fp32``: this checkout, float32 asked for by name;
- ``current-int8``: this checkout with ``DetectorOptions(precision="int8")`` (the bundle's INT8 graph); a
  code or bundle without one is reported as skipped, with the reason.

Every row runs in its own process (``latency_worker.py``), which imports pcedge from the row's tree and
records the commit and the files it imported. Rows are interleaved round by round (the order rotates), so
a burst of other work on this shared machine lands on all of them; the headline per row is the round with
the lowest median (the least disturbed), and every round is in the JSON with the load average. If the
baseline code cannot open the bundle (a newer manifest), it exports its own with its own exporter.

    python benchmarks/bench_latency.py        # -> results/latency.json, results/latency.md (~2 min)
    python benchmarks/bench_latency.py --rounds 5 --repeats 500
    python benchmarks/bench_latency.py --rows current-fp32 --variants shipped ort-spinning blas-unlimited
    python benchmarks/bench_latency.py --rows current-fp32 --variants shipped no-split ort-spinning-stop

``--variants`` adds the process-level thread settings the runtime's defaults replaced (ONNX Runtime's
intra-op spinning, numpy's BLAS on every core, the single-stream path's resize and index on one thread:
``no-split``), as extra rows on the current code; ``spin-off`` / ``spin-on`` / ``spin-auto`` set
``DetectorOptions.ort_spinning`` (the current rows run its default, "auto"). Spinning off / on / auto for
FP32 and INT8, quiet and contended, interleaved in one process: ``benchmarks/bench_spinning.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BSDATA,
    BUNDLES,
    OFFICIAL_MS_PER_IMAGE_CONTEXT,
    RESULTS,
    ROOT,
    MachineInfo,
    cached_bundle,
    load_average,
    log,
    machine_info,
    write_json,
)

from pcedge.runtime.files import write_text_atomic  # noqa: E402

TARGET_MS = 6.0
STAGES = ("preprocess", "backbone", "index", "scoring")
ROWS = ("baseline-fp32", "current-default", "current-fp32", "current-int8")
WORKER = Path(__file__).resolve().parent / "latency_worker.py"


@dataclass
class Variant:
    """Process-level thread settings a row runs under (the bundle and the code are the same)."""

    name: str
    ort_spinning: bool | None  # None: as the runtime's backend sets it
    blas_threads: str  # "default" (DetectorOptions' own), "none" (numpy's: every core) or N
    description: str
    split_threads: str = "default"  # "default" (DetectorOptions' own) or N (DetectorOptions.split_threads)
    ort_spinning_stop: bool = False  # with ort_spinning: ONNX Runtime's session.force_spinning_stop as well
    spin: str | None = None  # "off" / "on" / "auto": DetectorOptions.ort_spinning (None: the runtime's default)


VARIANTS = {
    "shipped": Variant("shipped", None, "default", "the runtime's defaults"),
    "ort-spinning": Variant("ort-spinning", True, "default",
                            "ONNX Runtime's intra-op threads busy-wait after each run (its own default)"),
    "blas-unlimited": Variant("blas-unlimited", None, "none",
                              "numpy's BLAS on its default thread count (every core) for the exact index"),
    "previous-defaults": Variant("previous-defaults", True, "none", "both: ONNX Runtime's and numpy's defaults"),
    "no-split": Variant("no-split", None, "default",
                        "the single-stream path's resize and exact index on one thread (split_threads = 1)",
                        split_threads="1"),
    "ort-spinning-stop": Variant("ort-spinning-stop", True, "default",
                                 "ONNX Runtime's intra-op threads spin during a run and stop when it returns "
                                 "(session.force_spinning_stop)", ort_spinning_stop=True),
    # DetectorOptions.ort_spinning, as the runtime offers it (benchmarks/bench_spinning.py runs all three for
    # FP32 and INT8, quiet and contended).
    "spin-off": Variant("spin-off", None, "default", "DetectorOptions.ort_spinning = False", spin="off"),
    "spin-on": Variant("spin-on", None, "default", "DetectorOptions.ort_spinning = True", spin="on"),
    "spin-auto": Variant("spin-auto", None, "default", "DetectorOptions.ort_spinning = 'auto' (the default)",
                         spin="auto"),
}


@dataclass
class Row:
    name: str  # e.g. current-fp32, or current-fp32/ort-spinning for a thread variant
    code: str  # baseline | current
    precision: str  # default | fp32 | int8
    variant: str


@dataclass
class RowSummary:
    row: str
    code: str
    precision: str
    variant: str
    status: str  # ran | skipped
    reason: str  # why skipped
    commit: str  # the commit whose code ran (plus "+dirty" for uncommitted changes)
    imported_from: str  # pcedge.runtime's folder in the worker
    description: str
    index_kind: str
    median_ms: float | None  # headline round: wall time per run_frames call, decode excluded
    p95_ms: float | None
    # The median of the rounds' medians <= TARGET_MS: the headline round alone is the least disturbed one, so
    # the target is judged on the typical round.
    meets_target: bool | None
    median_of_rounds_ms: float | None
    stages_p50_ms: dict[str, float]
    headline_round: int | None
    medians_by_round: list[float]
    bundle: str
    bundle_note: str
    # Against the baseline row in the same round, median over rounds (ms; negative: faster). Robust to load
    # that changes between rounds, which moves both rows of a round together. Empty for the baseline itself.
    paired_delta_ms: dict[str, float] = field(default_factory=dict)  # per stage and "end to end"


@dataclass
class LatencyReport:
    target_ms: float
    setting: str
    baseline_ref: str
    baseline_commit: str
    current_commit: str
    bundle: str
    bundle_reused_from_cache: bool
    images: str
    machine: MachineInfo
    repeats: int
    warmup: int
    summary: list[RowSummary]
    rounds: list[dict] = field(default_factory=list)  # round -> row -> the worker's record
    variants: list[Variant] = field(default_factory=list)
    context: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BSDATA, help="MVTec-layout category (train/good, test/*)")
    parser.add_argument("--baseline", default=None,
                        help="git ref of the code to compare with (default: git merge-base HEAD main)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["shipped"],
                        help="thread settings; beyond 'shipped' they are added for current-fp32 only")
    parser.add_argument("--repeats", type=int, default=300, help="timed images per row per round (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed images per row per round first (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--index", default="auto", help="index the rows use (default auto: the default path)")
    parser.add_argument("--threads", type=int, default=None, help="DetectorOptions.threads (default: the runtime's)")
    parser.add_argument("--fresh", action="store_true", help="re-export the bundle even if a cached one matches")
    parser.add_argument("--out", type=Path, default=RESULTS / "latency.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "latency.md")
    return parser.parse_args(argv)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def make_rows(names: list[str], variants: list[str]) -> list[Row]:
    rows = []
    for name in names:
        code, precision = name.split("-")
        rows.append(Row(name, code, precision, "shipped"))
    for variant in variants:
        if variant != "shipped":
            rows.append(Row(f"current-fp32/{variant}", "current", "fp32", variant))
    return rows


def run_worker(row: Row, tree: Path, bundle: Path, args: argparse.Namespace, baseline_commit: str,
               workdir: Path) -> dict:
    """One row in a fresh process importing pcedge from ``tree``; the worker's JSON record."""
    variant = VARIANTS[row.variant]
    out = workdir / f"{row.name.replace('/', '_')}.json"
    command = [sys.executable, str(WORKER), "--tree", str(tree), "--bundle", str(bundle), "--data", str(args.data),
               "--precision", row.precision, "--index", args.index, "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--blas-threads", variant.blas_threads, "--out", str(out)]
    if row.code == "baseline":
        # A bundle this code can open, exported by this code, if the shared one is too new for it.
        command += ["--export-to", str(BUNDLES / f"bsdata_default@{baseline_commit[:12]}.pcedge")]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if variant.ort_spinning is not None:
        command += ["--ort-spinning", "1" if variant.ort_spinning else "0"]
    if variant.ort_spinning_stop:
        command += ["--ort-spinning-stop"]
    if variant.split_threads != "default":
        command += ["--split-threads", variant.split_threads]
    if variant.spin is not None:
        command += ["--spin", variant.spin]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        return {"status": "failed", "reason": f"worker exited with {done.returncode}: {tail}"}
    return json.loads(out.read_text())


def summarise(rows: list[Row], rounds: list[dict]) -> list[RowSummary]:
    """Per row: the round with the lowest median (the least disturbed one) as the headline."""
    summary = []
    for row in rows:
        records = [r[row.name] for r in rounds]
        ran = [(i, rec) for i, rec in enumerate(records) if rec.get("status") == "ran"]
        first = ran[0][1] if ran else records[0]
        commit = first.get("git", {}).get("commit", "?")
        commit += "+dirty" if first.get("git", {}).get("dirty") else ""
        common = dict(row=row.name, code=row.code, precision=row.precision, variant=row.variant, commit=commit,
                      imported_from=str(Path(first.get("imported", {}).get("pcedge.runtime", "?")).parent),
                      bundle=first.get("bundle", ""), bundle_note=first.get("bundle_note", ""))
        if not ran:
            summary.append(RowSummary(**common, status=first.get("status", "skipped"), reason=first.get("reason", ""),
                                      description="", index_kind="", median_ms=None, p95_ms=None, meets_target=None,
                                      median_of_rounds_ms=None,
                                      stages_p50_ms={}, headline_round=None, medians_by_round=[]))
            continue
        medians = [rec["per_image_ms"]["p50"] for _, rec in ran]
        best_i, best = min(ran, key=lambda item: item[1]["per_image_ms"]["p50"])
        summary.append(RowSummary(
            **common, status="ran", reason="", description=best["description"], index_kind=best["index_kind"],
            median_ms=best["per_image_ms"]["p50"], p95_ms=best["per_image_ms"]["p95"],
            meets_target=float(statistics.median(medians)) <= TARGET_MS,
            median_of_rounds_ms=float(statistics.median(medians)),
            stages_p50_ms={s: best["stages_ms"][s]["p50"] for s in STAGES}, headline_round=best_i + 1,
            medians_by_round=medians, paired_delta_ms=paired_deltas(row, rounds)))
    return summary


def paired_deltas(row: Row, rounds: list[dict]) -> dict[str, float]:
    """Per stage and end to end: median over rounds of (this row - baseline-fp32 in the same round)."""
    import numpy as np

    if row.code == "baseline":
        return {}
    pairs = [(r[row.name], r["baseline-fp32"]) for r in rounds
             if r.get(row.name, {}).get("status") == "ran" and r.get("baseline-fp32", {}).get("status") == "ran"]
    if not pairs:
        return {}
    deltas = {stage: float(np.median([a["stages_ms"][stage]["p50"] - b["stages_ms"][stage]["p50"] for a, b in pairs]))
              for stage in STAGES}
    deltas["end to end"] = float(np.median([a["per_image_ms"]["p50"] - b["per_image_ms"]["p50"] for a, b in pairs]))
    return deltas


def short(commit: str) -> str:
    """``fe4377bbde8b...`` -> ``fe4377bbde8b`` (with ``+dirty`` kept: uncommitted changes ran)."""
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def markdown(report: LatencyReport) -> str:
    m = report.machine
    lines = [
        "# Latency: the CPU default path, today's code beside the baseline (results/latency.json)",
        "",
        f"{report.setting}. Target: at most {report.target_ms:.0f} ms median. {m.cpu_model}, {m.usable_cpus} usable "
        f"CPUs; load average {m.loadavg_start[0]:.2f} at the start, "
        f"{(m.loadavg_end or [float('nan')])[0]:.2f} at the end (the machine is shared: re-run on a quiet one "
        f"with `python benchmarks/bench_latency.py`). Baseline `{report.baseline_ref}` = "
        f"{short(report.baseline_commit)}; current {short(report.current_commit)}. Images: {report.images}. "
        f"{report.repeats} timed images per row and round, {len(report.rounds)} interleaved rounds; headline = the "
        f"round with the lowest median; the target is judged on the median of the rounds' medians.",
        "",
        "Milliseconds per image (median of the headline round; stages are medians of their own; the median "
        "of rounds is the median of every round's median).",
        "",
        "| row | commit | median | p95 | preprocess | backbone | index | scoring | median of rounds | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in report.summary:
        if s.status != "ran":
            lines.append(f"| {s.row} | {short(s.commit)} | – | – | – | – | – | – | – | skipped: {s.reason} |")
            continue
        st = s.stages_p50_ms
        lines.append(f"| {s.row} | {short(s.commit)} | **{s.median_ms:.2f}** | {s.p95_ms:.2f} | {st['preprocess']:.2f} | "
                     f"{st['backbone']:.2f} | {st['index']:.2f} | {st['scoring']:.2f} | {s.median_of_rounds_ms:.2f} | "
                     f"{'met' if s.meets_target else 'missed'} ({s.median_of_rounds_ms:.2f} vs {report.target_ms:.0f}) |")
    lines += ["", "What each row ran (the detector's description):", ""]
    lines += [f"- {s.row}: {s.description}" for s in report.summary if s.status == "ran"]
    base = next((s for s in report.summary if s.row == "baseline-fp32" and s.status == "ran"), None)
    if base is not None:
        lines += ["", "Per stage, before -> after (ms, median):", "",
                  "| stage | " + " | ".join(f"{s.row}" for s in report.summary if s.status == "ran") + " |",
                  "|---|" + "---:|" * sum(s.status == "ran" for s in report.summary)]
        for stage in (*STAGES, "end to end"):
            cells = []
            for s in report.summary:
                if s.status != "ran":
                    continue
                value = s.median_ms if stage == "end to end" else s.stages_p50_ms[stage]
                ref = base.median_ms if stage == "end to end" else base.stages_p50_ms[stage]
                cells.append(f"{value:.2f}" if s is base else f"{value:.2f} ({value - ref:+.2f})")
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    paired = [s for s in report.summary if s.paired_delta_ms]
    if paired:
        lines += ["", "Paired against the baseline in the same round (median over rounds of the difference, ms; "
                      "the load moves both rows of a round together, so this is the steadier comparison):", "",
                  "| row | " + " | ".join((*STAGES, "end to end")) + " |", "|---|" + "---:|" * (len(STAGES) + 1)]
        for s in paired:
            lines.append(f"| {s.row} | " + " | ".join(f"{s.paired_delta_ms[k]:+.2f}" for k in (*STAGES, "end to end"))
                         + " |")
    lines += ["", "Medians by round (ms): " + "; ".join(
        f"{s.row} {', '.join(f'{v:.2f}' for v in s.medians_by_round)}" for s in report.summary if s.status == "ran"),
        "", f"Context: {report.context}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = make_rows(args.rows, args.variants)
    cached = cached_bundle("bsdata_default", args.data, fresh=args.fresh)
    machine = machine_info()
    ref = args.baseline or git("merge-base", "HEAD", "main")
    baseline_commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    current_commit = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    if baseline_commit == current_commit.removesuffix("+dirty") and any(r.code == "baseline" for r in rows):
        log(f"note: the baseline {ref} is the current commit (on main, pass --baseline with the commit to compare "
            f"with, e.g. --baseline fe4377b); the rows still run, but compare the same code")
    rounds: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench_latency_"))
    baseline_tree = workdir / "baseline"
    needs_baseline = any(r.code == "baseline" for r in rows)
    try:
        if needs_baseline:
            git("worktree", "add", "--detach", "--quiet", str(baseline_tree), baseline_commit)
            log(f"baseline {ref} = {baseline_commit[:12]} checked out in {baseline_tree}")
        for number in range(1, args.rounds + 1):
            shift = (number - 1) % len(rows)
            order = rows[shift:] + rows[:shift]  # rotate, so no row always runs first or last
            records: dict = {"round": number, "loadavg_before": load_average(), "order": [r.name for r in order]}
            for row in order:
                started = time.perf_counter()
                tree = baseline_tree if row.code == "baseline" else ROOT
                record = run_worker(row, tree, cached.path, args, baseline_commit, workdir)
                records[row.name] = record
                if record.get("status") == "ran":
                    st = record["stages_ms"]
                    log(f"round {number} {row.name:28s} median {record['per_image_ms']['p50']:6.2f} ms ("
                        + ", ".join(f"{s} {st[s]['p50']:.2f}" for s in STAGES)
                        + f"; {time.perf_counter() - started:.0f} s; load {load_average()[0]})")
                else:
                    log(f"round {number} {row.name:28s} {record.get('status')}: {record.get('reason')}")
            records["loadavg_after"] = load_average()
            rounds.append(records)
    finally:
        if needs_baseline and baseline_tree.exists():
            git("worktree", "remove", "--force", str(baseline_tree))
        shutil.rmtree(workdir, ignore_errors=True)

    summary = summarise(rows, rounds)
    machine.loadavg_end = load_average()
    report = LatencyReport(
        target_ms=TARGET_MS,
        setting=f"bundle exported with default settings; ort-cpu with the runtime's defaults; index {args.index}; "
                f"batch 1; decode excluded, everything else included",
        baseline_ref=ref, baseline_commit=baseline_commit, current_commit=current_commit,
        bundle=str(cached.path), bundle_reused_from_cache=cached.reused,
        images=f"{args.data / 'test'} (80 frames, good and defective)", machine=machine, repeats=args.repeats,
        warmup=args.warmup, summary=summary, rounds=rounds,
        variants=[VARIANTS[v] for v in args.variants],
        context=f"the official implementation (amazon-science/patchcore-inspection) takes about "
                f"{OFFICIAL_MS_PER_IMAGE_CONTEXT:.0f} ms per image on this machine with the same backbone "
                f"(reported to us, not measured by this script)",
    )
    write_json(args.out, report)
    write_text_atomic(args.markdown, markdown(report))
    print(f"{'row':28s} {'commit':18s} {'median':>7s} {'p95':>7s}  preprocess backbone  index scoring  (ms)  "
          f"target {TARGET_MS:.0f} ms")
    for s in summary:
        if s.status != "ran":
            print(f"{s.row:28s} {short(s.commit):18s} {s.status}: {s.reason}")
            continue
        st = s.stages_p50_ms
        print(f"{s.row:28s} {short(s.commit):18s} {s.median_ms:7.2f} {s.p95_ms:7.2f}  {st['preprocess']:10.2f} "
              f"{st['backbone']:8.2f} {st['index']:6.2f} {st['scoring']:7.2f}  {'met' if s.meets_target else 'MISSED':>6s} "
              f"(median of rounds {s.median_of_rounds_ms:.2f})")
    print(f"wrote {args.out} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
