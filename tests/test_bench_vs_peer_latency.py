"""benchmarks/bench_vs_peer_latency.py: its refusals (the measurement itself needs the shared data and the
peer's anomalib, so it is a benchmark, not a test)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("bench_vs_peer_latency")
    yield module
    sys.modules.pop("bench_vs_peer_latency", None)


def test_a_missing_peer_interpreter_is_named_with_what_to_install(bench, tmp_path, capsys):
    missing = tmp_path / "no-such-venv" / "bin" / "python"
    # --fresh: the peer's cached ONNX file (if any) must not hide the missing interpreter
    assert bench.main(["--peer-python", str(missing), "--fresh", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "requirements-peer.txt" in err and "Traceback" not in err
    assert not list(tmp_path.glob("vs_peer_latency*"))  # nothing written


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--threads", "0"], ["--images", "-1"], ["--precision", "int4"]])
def test_bad_options_exit_2(bench, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(bad)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
