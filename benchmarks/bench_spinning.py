"""ONNX Runtime spinning on the single-stream CPU path: off / on / auto, FP32 and INT8, quiet and contended.

``DetectorOptions.ort_spinning`` False (one session that never busy-waits), True (the backbone's intra-op
threads spin during each run and stop when it returns) and "auto" (the default: a second session that
spins while ``runtime/spin_governor.py`` finds the frames faster). Measured end to end as
``bench_latency.py`` measures a row (default BSData bundle, ort-cpu, batch 1, decode excluded), for the
FP32 and the INT8 graph, in two conditions:

- ``quiet``: nothing of ours runs beside it (the machine's other load shows in the load average);
- ``contended``: a competing process runs a pure-Python busy loop throughout (started just before the
  worker, killed after it; not pinned, so the scheduler places it as it would a user's job): on a 2-core
  machine it holds about one core.

Each (round, condition, precision) is one process (``spinning_worker.py``) holding the three detectors and
running them in alternating blocks of 30 frames, so the three modes share the same moments of the machine
(separate processes one after another did not: on this shared machine the load moved by several ms between
10-second rows). The comparisons are paired block by block (median over blocks of the difference of
adjacent blocks' medians, then median over rounds): auto - on when quiet (target: within ~0.1 ms), auto -
off when contended (target: no worse beyond the noise). The JSON keeps every round's record, the load
average before and after, and for "auto" how many runs spun and what the governor did.

    python benchmarks/bench_spinning.py                 # -> results/latency_spinning.{json,md} (~4 min)
    python benchmarks/bench_spinning.py --rounds 5 --repeats 600
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import git  # noqa: E402
from common import BSDATA, RESULTS, ROOT, MachineInfo, cached_bundle, load_average, log, machine_info, write_json  # noqa: E402

from pcedge.runtime.files import write_text_atomic  # noqa: E402

CONDITIONS = ("quiet", "contended")
PRECISIONS = ("fp32", "int8")
#: Quiet: auto may be this much slower than "on" (ms, median end to end) and still count as the spinning figure.
QUIET_TOLERANCE_MS = 0.1
#: The competing job: a pure-Python loop holds one core and touches no memory worth mentioning.
BUSY_LOOP = "while True: pass"


class Competitor:
    """A busy child process for the duration of a ``with`` block (killed and reaped at its end)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Competitor":
        if self.enabled:
            self.process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
            time.sleep(0.2)  # running before the row's worker starts
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@dataclass
class SpinRowSummary:
    condition: str  # quiet | contended
    precision: str  # fp32 | int8
    spin: str  # off | on | auto
    status: str  # ran | skipped | failed
    reason: str
    medians_by_round: list[float]  # end to end, ms per image (median of the round's run_frames calls)
    median_ms: float | None  # median of medians_by_round
    best_ms: float | None  # the least disturbed round
    backbone_by_round: list[float]
    p95_by_round: list[float]
    loadavg_by_round: list[list[float]]  # 1-minute load before and after the row, per round
    spinning_share: float | None  # runs on the spinning session / all runs (all rounds); None: no counts
    governor_by_round: list[dict] = field(default_factory=list)  # auto: the governor's counters per round
    description: str = ""


@dataclass
class Comparison:
    condition: str
    precision: str
    what: str  # e.g. "auto - on"
    paired_delta_ms: float  # median over rounds of the block-paired difference (a - b), end to end
    deltas_by_round: list[float]
    median_delta_ms: float  # median over rounds of (a's median - b's median) in the same process
    median_deltas_by_round: list[float]
    noise_ms: float  # median absolute deviation of the reference row's medians over rounds
    target: str
    met: bool


@dataclass
class SpinningReport:
    setting: str
    current_commit: str
    bundle: str
    machine: MachineInfo
    repeats: int
    warmup: int
    rounds: int
    competitor: str
    summary: list[SpinRowSummary]
    comparisons: list[Comparison]
    memory: list[MemoryRow]
    records: list[dict] = field(default_factory=list)  # round -> row -> the worker's record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BSDATA, help="MVTec-layout category (train/good, test/*)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--repeats", type=int, default=300, help="timed frames per mode per round (default 300)")
    parser.add_argument("--block", type=int, default=30, help="frames per mode before the next one runs (default 30)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed frames per mode per round first (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--index", default="auto", help="index the rows use (default auto: the default path)")
    parser.add_argument("--threads", type=int, default=None, help="DetectorOptions.threads (default: the runtime's)")
    parser.add_argument("--fresh", action="store_true", help="re-export the bundle even if a cached one matches")
    parser.add_argument("--out", type=Path, default=RESULTS / "latency_spinning.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "latency_spinning.md")
    return parser.parse_args(argv)


WORKER = Path(__file__).resolve().parent / "spinning_worker.py"
MODES = ("off", "on", "auto")
#: The differences reported per condition (a, b: a - b); the first is the condition's target.
COMPARISONS = {"quiet": [("auto", "on"), ("on", "off"), ("auto", "off")],
               "contended": [("auto", "off"), ("on", "off"), ("auto", "on")]}


def run_worker(condition: str, precision: str, bundle: Path, args: argparse.Namespace, workdir: Path,
               modes: tuple[str, ...] = MODES, repeats: int | None = None) -> dict:
    """One process with ``modes`` interleaved, the competitor beside it when contended."""
    out = workdir / f"{condition}_{precision}_{'-'.join(modes)}.json"
    command = [sys.executable, str(WORKER), "--tree", str(ROOT), "--bundle", str(bundle), "--data", str(args.data),
               "--precision", precision, "--index", args.index, "--repeats", str(repeats or args.repeats),
               "--block", str(args.block), "--warmup", str(args.warmup), "--out", str(out), "--modes", *modes]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    with Competitor(condition == "contended"):
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        return {"status": "failed", "reason": f"worker exited with {done.returncode}: {tail}"}
    return json.loads(out.read_text())


@dataclass
class MemoryRow:
    """Resident memory of a process holding one detector, after it has run frames (both sessions, for auto)."""

    precision: str
    off_mb: float  # VmRSS rise from before Detector.open to after the frames, ort_spinning=False
    auto_mb: float  # the same with "auto"
    extra_mb: float  # auto - off: the second (spinning) session


def measure_memory(bundle: Path, args: argparse.Namespace, workdir: Path) -> list[MemoryRow]:
    """Per precision, one process with ``off`` alone and one with ``auto`` alone (quiet, 60 frames each)."""
    rows = []
    for precision in args.precisions:
        rise = {}
        for mode in ("off", "auto"):
            rec = run_worker("quiet", precision, bundle, args, workdir, modes=(mode,), repeats=60)
            if rec.get("status") != "ran" or rec.get("rss_mb_before_open") is None:
                break
            rise[mode] = rec["rss_mb_after"] - rec["rss_mb_before_open"]
        if len(rise) == 2:
            rows.append(MemoryRow(precision, rise["off"], rise["auto"], rise["auto"] - rise["off"]))
            log(f"memory {precision}: off +{rise['off']:.1f} MB, auto +{rise['auto']:.1f} MB "
                f"(the spinning session: +{rise['auto'] - rise['off']:.1f} MB)")
    return rows


def summarise(records: list[dict]) -> list[SpinRowSummary]:
    """``records``: per round, ``{"condition/precision": worker record}``."""
    summary = []
    keys = list(dict.fromkeys(k for r in records for k in r if "/" in k))
    for key in keys:
        condition, precision = key.split("/")
        ran = [r[key] for r in records if r.get(key, {}).get("status") == "ran"]
        for mode in MODES:
            if not ran:
                first = next((r[key] for r in records if key in r), {})
                summary.append(SpinRowSummary(condition, precision, mode, first.get("status", "failed"),
                                              first.get("reason", "no record"), [], None, None, [], [], [], None))
                continue
            recs = [rec["modes"][mode] for rec in ran]
            medians = [m["per_image_ms"]["p50"] for m in recs]
            runs = [m["spin"].get("runs", {}) for m in recs]
            plain, spinning = sum(r.get("plain", 0) for r in runs), sum(r.get("spinning", 0) for r in runs)
            summary.append(SpinRowSummary(
                condition, precision, mode, "ran", "", medians, statistics.median(medians), min(medians),
                [m["stages_ms"]["backbone"]["p50"] for m in recs], [m["per_image_ms"]["p95"] for m in recs],
                [[round(rec["loadavg_before"][0], 2), round(rec["loadavg_after"][0], 2)] for rec in ran],
                spinning / (plain + spinning) if plain + spinning else None,
                [m["spin"]["governor"] for m in recs if "governor" in m["spin"]], recs[0]["description"]))
    return summary


def compare(records: list[dict]) -> list[Comparison]:
    """Per condition and precision: block-paired differences (see the module), median over rounds."""
    out = []
    keys = list(dict.fromkeys(k for r in records for k in r if "/" in k))
    for key in keys:
        condition, precision = key.split("/")
        ran = [r[key] for r in records if r.get(key, {}).get("status") == "ran"]
        if not ran:
            continue
        for i, (a, b) in enumerate(COMPARISONS[condition]):
            by_round, medians_by_round = [], []
            for rec in ran:
                blocks_a, blocks_b = rec["modes"][a]["block_medians_ms"], rec["modes"][b]["block_medians_ms"]
                by_round.append(statistics.median([x - y for x, y in zip(blocks_a, blocks_b)]))
                medians_by_round.append(rec["modes"][a]["per_image_ms"]["p50"] - rec["modes"][b]["per_image_ms"]["p50"])
            median_delta = statistics.median(medians_by_round)
            reference = [rec["modes"][b]["per_image_ms"]["p50"] for rec in ran]
            centre = statistics.median(reference)
            # The reference mode's spread between rounds: how much the machine moved a median here.
            noise = statistics.median([abs(v - centre) for v in reference]) if len(reference) > 1 else 0.0
            delta = statistics.median(by_round)
            worst = max(delta, median_delta)  # met only if both ways of pairing agree
            if i > 0:
                target, met = "for scale", True
            elif condition == "quiet":
                target, met = f"auto within {QUIET_TOLERANCE_MS} ms of on", worst <= QUIET_TOLERANCE_MS
            else:
                allowed = max(QUIET_TOLERANCE_MS, noise)
                target, met = f"auto no worse than off beyond noise ({allowed:.2f} ms)", worst <= allowed
            out.append(Comparison(condition, precision, f"{a} - {b}", delta, by_round, median_delta,
                                  medians_by_round, noise, target, met))
    return out


def markdown(report: SpinningReport) -> str:
    m = report.machine
    lines = [
        "# ONNX Runtime spinning on the single-stream CPU path (results/latency_spinning.json)",
        "",
        f"{report.setting}. {m.cpu_model}, {m.usable_cpus} usable CPUs; load average {m.loadavg_start[0]:.2f} at the "
        f"start, {(m.loadavg_end or [float('nan')])[0]:.2f} at the end. Contended: {report.competitor}. "
        f"{report.repeats} timed images per row and round, {report.rounds} interleaved rounds; current "
        f"{report.current_commit[:12]}{'+dirty' if report.current_commit.endswith('+dirty') else ''}. "
        "Re-run: `python benchmarks/bench_spinning.py`.",
        "",
        "Milliseconds per image end to end (median of the rounds' medians; backbone likewise; in brackets the "
        "least disturbed round). Spinning share: runs on the spinning session / all runs (warm-up included).",
        "",
        "| condition | precision | spinning | median | backbone | p95 | spinning share | rounds | load (1 min, before/after) |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for s in report.summary:
        if s.status != "ran":
            lines.append(f"| {s.condition} | {s.precision} | {s.spin} | – | – | – | – | {s.status}: {s.reason} | |")
            continue
        share = "–" if s.spinning_share is None else f"{100 * s.spinning_share:.0f} %"
        lines.append(
            f"| {s.condition} | {s.precision} | {s.spin} | **{s.median_ms:.2f}** ({s.best_ms:.2f}) | "
            f"{statistics.median(s.backbone_by_round):.2f} | {statistics.median(s.p95_by_round):.2f} | {share} | "
            f"{', '.join(f'{v:.2f}' for v in s.medians_by_round)} | "
            f"{'; '.join(f'{a:.2f}/{b:.2f}' for a, b in s.loadavg_by_round)} |")
    lines += ["", "Differences, end to end, ms, two ways: block-paired (within a round the median over blocks of the "
              "difference between adjacent blocks' medians) and of the modes' medians in the same process; each "
              "the median over rounds, then per round. Noise: median absolute deviation of the reference mode's "
              "median over rounds. A target is met only when both are within it.", "",
              "| condition | precision | difference | block-paired | by round | of medians | by round | noise | target | |",
              "|---|---|---|---:|---|---:|---|---:|---|---|"]
    for c in report.comparisons:
        verdict = "" if c.target == "for scale" else ("met" if c.met else "**missed**")
        lines.append(f"| {c.condition} | {c.precision} | {c.what} | {c.paired_delta_ms:+.2f} | "
                     f"{', '.join(f'{d:+.2f}' for d in c.deltas_by_round)} | {c.median_delta_ms:+.2f} | "
                     f"{', '.join(f'{d:+.2f}' for d in c.median_deltas_by_round)} | {c.noise_ms:.2f} | "
                     f"{c.target} | {verdict} |")
    if report.memory:
        lines += ["", "Memory: the rise of a process's resident memory (VmRSS) from before `Detector.open` to after 60 "
                  "frames, one detector per process:", "", "| precision | off | auto | the spinning session |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {m.precision} | {m.off_mb:.1f} MB | {m.auto_mb:.1f} MB | +{m.extra_mb:.1f} MB |" for m in report.memory]
    governors = [(s, g) for s in report.summary for g in s.governor_by_round]
    if governors:
        lines += ["", "The governor in the auto rows (per round: probes won / lost, alarms, state at the end):", ""]
        for s in report.summary:
            if s.governor_by_round:
                lines.append(f"- {s.condition} {s.precision}: " + "; ".join(
                    f"{g['probes_won']}/{g['probes_lost']}, {g['alarms']}, {g['state']}" for g in s.governor_by_round))
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cached = cached_bundle("bsdata_default", args.data, fresh=args.fresh)
    machine = machine_info()
    current_commit = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    records: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench_spinning_"))
    started = time.perf_counter()
    try:
        for number in range(1, args.rounds + 1):
            conditions = args.conditions if number % 2 else list(reversed(args.conditions))
            record: dict = {"round": number, "loadavg_before": load_average()}
            for condition in conditions:
                for precision in args.precisions:
                    key = f"{condition}/{precision}"
                    record[key] = rec = run_worker(condition, precision, cached.path, args, workdir)
                    if rec.get("status") == "ran":
                        log(f"round {number} {key:15s} median " + ", ".join(
                            f"{mode} {m['per_image_ms']['p50']:.2f}" for mode, m in rec["modes"].items())
                            + f" ms; auto spun {rec['modes']['auto']['spin'].get('runs', {}).get('spinning', '?')}"
                            f" runs; load {load_average()[0]}")
                    else:
                        log(f"round {number} {key:15s} {rec.get('status')}: {rec.get('reason')}")
            record["loadavg_after"] = load_average()
            records.append(record)
        memory = measure_memory(cached.path, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    machine.loadavg_end = load_average()
    report = SpinningReport(
        setting=f"default BSData bundle ({cached.path.name}), ort-cpu, index {args.index}, batch 1, decode excluded; "
                f"DetectorOptions.ort_spinning False (off) / True (on) / 'auto', interleaved in blocks of "
                f"{args.block} frames in one process per round, condition and precision",
        current_commit=current_commit, bundle=str(cached.path), machine=machine, repeats=args.repeats,
        warmup=args.warmup, rounds=args.rounds,
        competitor=f"a child process running `{BUSY_LOOP}` in Python throughout, not pinned",
        summary=summarise(records), comparisons=compare(records), memory=memory, records=records)
    write_json(args.out, report)
    write_text_atomic(args.markdown, markdown(report))
    for c in report.comparisons:
        if c.target != "for scale":
            print(f"{c.condition:9s} {c.precision} {c.what}: {c.paired_delta_ms:+.2f} ms block-paired, "
                  f"{c.median_delta_ms:+.2f} of medians (noise {c.noise_ms:.2f}; {c.target}: "
                  f"{'met' if c.met else 'MISSED'})")
    print(f"wrote {args.out} and {args.markdown} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
