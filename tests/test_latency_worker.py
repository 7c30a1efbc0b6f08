"""benchmarks/latency_worker.py, the per-row process of bench_latency.py: it must import pcedge from the
tree it is given (the baseline's worktree), never from this checkout, and a row whose precision the code
or the bundle lacks must come back as skipped with the reason, not as a crash. No timing thresholds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import BSD, ROOT

WORKER = ROOT / "benchmarks" / "latency_worker.py"


def _copy_tree(to: Path) -> Path:
    """A second source tree (as a git worktree of another ref would be): pcedge/, export/, runtime/."""
    for folder in ("pcedge", "export", "runtime"):
        shutil.copytree(ROOT / folder, to / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return to


def test_worker_imports_pcedge_from_the_given_tree(tmp_path):
    tree = _copy_tree(tmp_path / "other")
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from latency_worker import import_pcedge_from; "
            "files = import_pcedge_from(Path(sys.argv[2])); import pcedge.runtime.scoring as s; "
            "files['scoring'] = s.__file__; print(json.dumps(files))")
    done = subprocess.run([sys.executable, "-c", code, str(WORKER.parent), str(tree)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = json.loads(done.stdout)
    assert set(files) == {"pcedge", "pcedge.runtime", "pcedge.runtime.detector", "scoring"}
    for name, file in files.items():
        assert Path(file).is_relative_to(tree), f"{name} came from {file}, not from the tree {tree}"


def test_worker_times_fp32_and_reports_a_missing_precision_as_skipped(tmp_path, fixture_bundle):
    records = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.json"
        done = subprocess.run([sys.executable, str(WORKER), "--tree", str(ROOT), "--bundle", str(fixture_bundle),
                               "--data", str(BSD), "--precision", precision, "--repeats", "3", "--warmup", "1",
                               "--frames", "2", "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        records[precision] = json.loads(out.read_text())
    fp32 = records["fp32"]
    assert fp32["status"] == "ran" and fp32["per_image_ms"]["n"] == 3 and fp32["imported"]["pcedge.runtime"].startswith(str(ROOT))
    assert set(fp32["stages_ms"]) == {"preprocess", "backbone", "index", "scoring"}
    assert len(fp32["git"]["commit"]) == 40 and fp32["bundle"] == str(fixture_bundle)
    int8 = records["int8"]
    graphs = {p.name for p in Path(fixture_bundle).glob("*.onnx")}
    if "model_int8.onnx" in graphs:  # a bundle exported once INT8 export has landed: the row runs
        assert int8["status"] == "ran" and int8["per_image_ms"]["n"] == 3
    else:
        assert int8["status"] == "skipped" and "int8" in int8["reason"].lower() and "model.onnx" in int8["reason"]


def test_worker_sets_the_spinning_mode_and_records_how_the_backbone_ran(tmp_path, fixture_bundle):
    """``--spin off|on|auto`` (bench_spinning.py's rows) is DetectorOptions.ort_spinning; the record counts the
    runs per session, and for auto the governor's counters; a legacy ``--ort-spinning`` variant still runs."""
    records = {}
    for name, flags in {"off": ["--spin", "off"], "on": ["--spin", "on"], "auto": ["--spin", "auto"],
                        "legacy": ["--ort-spinning", "1", "--ort-spinning-stop"]}.items():
        out = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, str(WORKER), "--tree", str(ROOT), "--bundle", str(fixture_bundle),
                               "--data", str(BSD), "--repeats", "20", "--warmup", "1", "--frames", "2",
                               "--out", str(out), *flags], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        records[name] = json.loads(out.read_text())
    assert records["off"]["spin"] == {"runs": {"plain": 21, "spinning": 0}}
    assert records["on"]["spin"] == {"runs": {"plain": 0, "spinning": 21}}
    auto = records["auto"]["spin"]
    assert auto["runs"]["plain"] + auto["runs"]["spinning"] == 21 and auto["runs"]["plain"] >= 8
    assert auto["governor"]["plain_runs"] == auto["runs"]["plain"] and auto["governor"]["state"] in ("plain", "probe", "spin")
    legacy = records["legacy"]
    assert legacy["status"] == "ran" and "force_spinning_stop" in legacy["description"]
    assert legacy["spin"]["runs"] == {"plain": 21, "spinning": 0}  # the one session, re-created spinning


def test_spinning_worker_interleaves_the_modes_in_blocks(tmp_path, fixture_bundle):
    """benchmarks/spinning_worker.py (bench_spinning.py's process): off / on / auto side by side in blocks,
    each mode's frames, stages, block medians and session runs recorded."""
    out = tmp_path / "spin.json"
    done = subprocess.run([sys.executable, str(WORKER.parent / "spinning_worker.py"), "--tree", str(ROOT),
                           "--bundle", str(fixture_bundle), "--data", str(BSD), "--frames", "2", "--repeats", "7",
                           "--block", "3", "--warmup", "1", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["status"] == "ran" and set(record["modes"]) == {"off", "on", "auto"}
    for mode, m in record["modes"].items():
        assert m["per_image_ms"]["n"] == 7 and len(m["block_medians_ms"]) == 3  # blocks of 3, 3, 1
        assert set(m["stages_ms"]) == {"preprocess", "backbone", "index", "scoring"}
    assert record["modes"]["off"]["spin"]["runs"] == {"plain": 8, "spinning": 0}
    assert record["modes"]["on"]["spin"]["runs"] == {"plain": 0, "spinning": 8}
    assert record["modes"]["auto"]["spin"]["governor"]["plain_runs"] == 8  # measures the plain session first
    assert record["rss_mb_after"] > record["rss_mb_before_open"] > 0


def test_the_default_row_runs_what_detector_options_run_by_default(tmp_path, fixture_bundle, bundle_factory):
    """``--precision default`` (bench_latency's current-default row) asks for no precision: on a bundle whose CPU
    INT8 graph shipped with its own threshold that is model_int8_cpu.onnx; on a float32-only bundle model.onnx.
    ``--precision fp32`` runs model.onnx on either."""
    from test_int8 import FAST

    int8_bundle = bundle_factory("bsd_int8", **FAST, int8_tolerance=0.5).bundle
    ran = {}
    for name, bundle, precision in (("int8-default", int8_bundle, "default"), ("int8-fp32", int8_bundle, "fp32"),
                                    ("fp32-default", fixture_bundle, "default")):
        out = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, str(WORKER), "--tree", str(ROOT), "--bundle", str(bundle),
                               "--data", str(BSD), "--precision", precision, "--repeats", "2", "--warmup", "1",
                               "--frames", "2", "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        record = json.loads(out.read_text())
        assert record["status"] == "ran", record
        ran[name] = record["description"]
    assert "model_int8_cpu.onnx: INT8, the ort-cpu default" in ran["int8-default"]
    assert "model.onnx: float32 (--precision fp32)" in ran["int8-fp32"]
    assert "model.onnx: float32: the bundle has no ONNX Runtime CPU INT8 graph" in ran["fp32-default"]
