"""Device commands on a real fixture bundle: predict (files, folders, globs, bad input), verify, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap


from pcedge.cli import main

from conftest import BSD, PCB, ROOT


def test_predict_folders_globs_overlays_and_jsonl(fixture_bundle, tmp_path, capsys):
    bad = tmp_path / "in" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    gray = tmp_path / "in" / "gray.png"
    shutil.copy(sorted((PCB / "test" / "good").iterdir())[0], gray)
    args = ["predict", str(fixture_bundle), str(BSD / "test" / "pitting"), str(BSD / "test" / "good" / "*.jpg"),
            str(tmp_path / "in"), "--save-maps", str(tmp_path / "maps"), "--jsonl", str(tmp_path / "p.jsonl"),
            "--batch", "4", "--backend", "ort-cpu"]
    code = main(args)
    out = capsys.readouterr()
    assert code == 1  # one file failed: non-zero at the end, after every other file was scored
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(records) == 18
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and "broken.jpg" in errors[0]["error"] and errors[0]["path"] == str(bad)
    ok = [r for r in records if "error" not in r]
    for r in ok:
        assert r["verdict"] in ("good", "anomalous") and set(r["timings_ms"]) >= {"preprocess", "backbone", "index", "scoring"}
    assert len(list((tmp_path / "maps").glob("*_overlay.png"))) == 17
    assert "summary: 17 scored" in out.out and "1 failed" in out.out and "p95" in out.out
    # same stem in two folders stays two overlays
    assert any("test__pitting__" in p.name for p in (tmp_path / "maps").iterdir())


def test_predict_bad_inputs(fixture_bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(fixture_bundle), str(empty)]) == 2
    assert "contains no images" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope.pcedge"), str(BSD / "test")]) == 2
    assert "no such bundle" in capsys.readouterr().err
    assert main(["predict", str(fixture_bundle), str(tmp_path / "missing.png")]) == 2


def test_verify_passes_and_fails_on_tampering(fixture_bundle, tmp_path, capsys):
    assert main(["verify", str(fixture_bundle), "--backend", "ort-cpu"]) == 0
    text = capsys.readouterr().out
    assert text.count("PASS ") == 8 and "PASS  index file" in text and "threshold" in text and "score spread" in text and "hnsw recall@1" in text and "worst rel error" in text
    copy = tmp_path / "t.pcedge"
    shutil.copytree(fixture_bundle, copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert main(["verify", str(copy)]) == 1
    text = capsys.readouterr().out
    assert "FAIL  checksums" in text and "model.onnx" in text


def test_runtime_predicts_without_torch(fixture_bundle, tmp_path):
    """The device side in a process where importing torch fails, as on a Jetson without PyTorch."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" or name.startswith(("torch.", "torchvision")):
                    raise ImportError("torch is not installed on this device")
        sys.meta_path.insert(0, NoTorch())
        from pcedge.cli import main
        code = main(["predict", {str(fixture_bundle)!r}, {str(BSD / "test" / "pitting")!r}, "--jsonl",
                     {str(tmp_path / "nt.jsonl")!r}, "--quiet"])
        assert "torch" not in sys.modules, "the runtime imported torch"
        assert main(["verify", {str(fixture_bundle)!r}]) == 0
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    lines = (tmp_path / "nt.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["score"] > 0 for line in lines)
