"""Install extras: the base package depends on neither ONNX Runtime wheel; without one, a clear message."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from pcedge.cli import main
from pcedge.runtime.backends import open_backend
from pcedge.runtime.bundle import open_bundle
from pcedge.runtime.errors import BackendUnavailable
from test_engines import write_tiny_bundle

ROOT = Path(__file__).resolve().parents[1]


def test_base_depends_on_neither_onnxruntime_wheel_and_each_extra_on_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("onnxruntime")]
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["cpu"]] == ["onnxruntime"]
    assert [d.split(">")[0] for d in extras["gpu"]] == ["onnxruntime-gpu"]
    assert any(d.startswith("cuda-bindings") for d in extras["test"])  # tests/test_cuda_calls.py needs it
    assert "'.[cpu,export,test,serve]'" in (ROOT / "Makefile").read_text()  # the CPU wheel, never the GPU one


@pytest.fixture
def without_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


def test_without_onnxruntime_every_backend_says_which_extra_to_install(without_onnxruntime, tmp_path):
    bundle = open_bundle(write_tiny_bundle(tmp_path / "tiny.pcedge"))
    for kind in ("ort-cpu", "ort-cuda", "auto"):
        with pytest.raises(BackendUnavailable, match=r"neither onnxruntime nor onnxruntime-gpu is installed: "
                                                     r"pip install 'pcedge\[cpu\]'"):
            open_backend(kind, bundle)


def test_commands_without_onnxruntime_exit_2_with_the_message(without_onnxruntime, tmp_path, capsys):
    root = write_tiny_bundle(tmp_path / "tiny.pcedge")
    assert main(["info", str(root)]) == 0  # reading a bundle needs no ONNX Runtime
    capsys.readouterr()
    assert main(["predict", str(root), str(ROOT / "tests" / "assets" / "coffee.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'pcedge[cpu]'" in err and "Traceback" not in err
