"""ONNX Runtime spinning on the single-stream CPU path: off / on / auto, FP32 and INT8, quiet and contended.

``DetectorOptions.ort_spinning`` False (one session that never busy-waits), True (the backbone's intra-op
threads spin during each run and stop when it returns) and "auto" (the default: a second session that
spins while ``runtime/spin_governor.py`` finds it faster). Each is measured end to end exactly as
``bench_latency.py`` measures a row (its ``latency_worker.py``, one process per row: the default BSData
bundle, ort-cpu, batch 1, decode excluded), for the FP32 and the INT8 graph, in two conditions:

- ``quiet``: nothing of ours runs beside the row (the machine's other load shows in the load average);
- ``contended``: a competing process runs a pure-Python busy loop for the duration of the row (started just
  before the worker, killed after it; not pinned, so the scheduler places it as it would a user's job): on a
  2-core machine it holds about one core.

Rows are interleaved: every round runs each condition's six rows in a rotated order, and the conditions
alternate which goes first. Per row the JSON keeps every round's median, the stages, the load average before
and after, and for "auto" how many runs spun. The comparisons are paired within a round (the load of a moment
moves all rows of a round together): auto - on in the quiet rounds (target: within ~0.1 ms), auto - off in
the contended rounds (target: no worse beyond the noise, here the spread of "off" between rounds).

    python benchmarks/bench_spinning.py                 # -> results/latency_spinning.{json,md} (~5 min)
    python benchmarks/bench_spinning.py --rounds 5 --repeats 500
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import STAGES, Row, git, run_worker  # noqa: E402
from common import BSDATA, RESULTS, ROOT, MachineInfo, cached_bundle, load_average, log, machine_info, write_json  # noqa: E402

from pcedge.runtime.files import write_text_atomic  # noqa: E402

CONDITIONS = ("quiet", "contended")
PRECISIONS = ("fp32", "int8")
SPIN_VARIANTS = ("spin-off", "spin-on", "spin-auto")
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
    paired_delta_ms: float  # median over rounds of (a - b) in the same round, end to end
    deltas_by_round: list[float]
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
    records: list[dict] = field(default_factory=list)  # round -> row -> the worker's record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BSDATA, help="MVTec-layout category (train/good, test/*)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--repeats", type=int, default=300, help="timed images per row per round (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed images per row per round first (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--index", default="auto", help="index the rows use (default auto: the default path)")
    parser.add_argument("--threads", type=int, default=None, help="DetectorOptions.threads (default: the runtime's)")
    parser.add_argument("--fresh", action="store_true", help="re-export the bundle even if a cached one matches")
    parser.add_argument("--out", type=Path, default=RESULTS / "latency_spinning.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "latency_spinning.md")
    return parser.parse_args(argv)


def row_name(condition: str, precision: str, variant: str) -> str:
    return f"{condition}/{precision}/{variant}"


def make_rows(args: argparse.Namespace) -> dict[str, list[Row]]:
    """Per condition, its rows (``Row.name`` = condition/precision/variant; the variant sets ort_spinning)."""
    return {c: [Row(row_name(c, p, v), "current", p, v) for p in args.precisions for v in SPIN_VARIANTS]
            for c in args.conditions}


def _spin(variant: str) -> str:
    return variant.removeprefix("spin-")


def summarise(rows: dict[str, list[Row]], rounds: list[dict]) -> list[SpinRowSummary]:
    summary = []
    for condition, condition_rows in rows.items():
        for row in condition_rows:
            records = [r[row.name] for r in rounds if row.name in r]
            ran = [rec for rec in records if rec.get("status") == "ran"]
            if not ran:
                first = records[0] if records else {}
                summary.append(SpinRowSummary(condition, row.precision, _spin(row.variant), first.get("status", "failed"),
                                              first.get("reason", "no record"), [], None, None, [], [], [], None))
                continue
            medians = [rec["per_image_ms"]["p50"] for rec in ran]
            plain = sum(rec.get("spin", {}).get("runs", {}).get("plain", 0) for rec in ran)
            spinning = sum(rec.get("spin", {}).get("runs", {}).get("spinning", 0) for rec in ran)
            summary.append(SpinRowSummary(
                condition, row.precision, _spin(row.variant), "ran", "", medians, statistics.median(medians),
                min(medians), [rec["stages_ms"]["backbone"]["p50"] for rec in ran],
                [rec["per_image_ms"]["p95"] for rec in ran],
                [[round(rec["loadavg_before"][0], 2), round(rec["loadavg_after"][0], 2)] for rec in ran],
                spinning / (plain + spinning) if plain + spinning else None,
                [rec["spin"]["governor"] for rec in ran if "governor" in rec.get("spin", {})],
                ran[0].get("description", "")))
    return summary


def compare(rows: dict[str, list[Row]], rounds: list[dict]) -> list[Comparison]:
    """Paired within each round: quiet auto - on (and on - off, for scale), contended auto - off (and on - off)."""
    wanted = {"quiet": [("auto", "on"), ("on", "off"), ("auto", "off")],
              "contended": [("auto", "off"), ("on", "off"), ("auto", "on")]}
    out = []
    precisions = sorted({r.precision for rs in rows.values() for r in rs}, key=PRECISIONS.index)
    for condition in rows:
        for precision in precisions:
            for a, b in wanted[condition]:
                name_a, name_b = (row_name(condition, precision, f"spin-{v}") for v in (a, b))
                pairs = [(r[name_a], r[name_b]) for r in rounds
                         if r.get(name_a, {}).get("status") == "ran" and r.get(name_b, {}).get("status") == "ran"]
                if not pairs:
                    continue
                deltas = [x["per_image_ms"]["p50"] - y["per_image_ms"]["p50"] for x, y in pairs]
                reference = [y["per_image_ms"]["p50"] for _, y in pairs]
                centre = statistics.median(reference)
                noise = statistics.median([abs(v - centre) for v in reference]) if len(reference) > 1 else 0.0
                delta = statistics.median(deltas)
                if (condition, a, b) == ("quiet", "auto", "on"):
                    target, met = f"auto within {QUIET_TOLERANCE_MS} ms of on", delta <= QUIET_TOLERANCE_MS
                elif (condition, a, b) == ("contended", "auto", "off"):
                    allowed = max(QUIET_TOLERANCE_MS, noise)
                    target, met = f"auto no worse than off beyond noise ({allowed:.2f} ms)", delta <= allowed
                else:
                    target, met = "for scale", True
                out.append(Comparison(condition, precision, f"{a} - {b}", delta, deltas, noise, target, met))
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
        "least disturbed round). Spinning share: runs on the spinning session / all runs.",
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
    lines += ["", "Paired within each round (median over rounds of the difference, end to end, ms; noise = median "
              "absolute deviation of the reference row over rounds):", "",
              "| condition | precision | difference | ms | by round | noise | target | |", "|---|---|---|---:|---|---:|---|---|"]
    for c in report.comparisons:
        verdict = "" if c.target == "for scale" else ("met" if c.met else "**missed**")
        lines.append(f"| {c.condition} | {c.precision} | {c.what} | {c.paired_delta_ms:+.2f} | "
                     f"{', '.join(f'{d:+.2f}' for d in c.deltas_by_round)} | {c.noise_ms:.2f} | {c.target} | {verdict} |")
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
    rows = make_rows(args)
    cached = cached_bundle("bsdata_default", args.data, fresh=args.fresh)
    machine = machine_info()
    current_commit = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    rounds: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench_spinning_"))
    started = time.perf_counter()
    try:
        for number in range(1, args.rounds + 1):
            conditions = list(rows) if number % 2 else list(reversed(rows))
            records: dict = {"round": number, "loadavg_before": load_average()}
            for condition in conditions:
                condition_rows = rows[condition]
                shift = (number - 1) % len(condition_rows)
                for row in condition_rows[shift:] + condition_rows[:shift]:
                    with Competitor(condition == "contended"):
                        record = run_worker(row, ROOT, cached.path, args, "", workdir)
                    records[row.name] = record
                    if record.get("status") == "ran":
                        st, spin = record["stages_ms"], record.get("spin", {}).get("runs", {})
                        log(f"round {number} {row.name:26s} median {record['per_image_ms']['p50']:6.2f} ms (backbone "
                            f"{st['backbone']['p50']:.2f}; runs plain/spinning {spin.get('plain', '?')}/"
                            f"{spin.get('spinning', '?')}; load {load_average()[0]})")
                    else:
                        log(f"round {number} {row.name:26s} {record.get('status')}: {record.get('reason')}")
            records["loadavg_after"] = load_average()
            rounds.append(records)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    machine.loadavg_end = load_average()
    report = SpinningReport(
        setting=f"default BSData bundle ({cached.path.name}), ort-cpu, index {args.index}, batch 1, decode excluded; "
                f"DetectorOptions.ort_spinning False (off) / True (on) / 'auto'",
        current_commit=current_commit, bundle=str(cached.path), machine=machine, repeats=args.repeats,
        warmup=args.warmup, rounds=args.rounds,
        competitor=f"a child process running `{BUSY_LOOP}` in Python for the duration of each row, not pinned",
        summary=summarise(rows, rounds), comparisons=compare(rows, rounds), records=rounds)
    write_json(args.out, report)
    write_text_atomic(args.markdown, markdown(report))
    for c in report.comparisons:
        if c.target != "for scale":
            print(f"{c.condition:9s} {c.precision} {c.what}: {c.paired_delta_ms:+.2f} ms (noise {c.noise_ms:.2f}; "
                  f"{c.target}: {'met' if c.met else 'MISSED'})")
    print(f"wrote {args.out} and {args.markdown} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
