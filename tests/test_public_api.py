"""The README's "Use it from Python" example runs as written, on the device library alone (torch blocked)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import cv2

from conftest import BSD, ROOT


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Use it from Python"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under 'Use it from Python'"
    return match.group(1)


def test_readme_python_example_runs_without_torch(fixture_bundle, tmp_path):
    code = readme_example()
    good = sorted((BSD / "test" / "good").iterdir())[:2]
    # The example's placeholders become the fixture bundle and real fixture images; nothing else changes.
    for placeholder, real in (("part.pcedge", fixture_bundle), ("a.png", good[0]), ("b.png", good[1]),
                              ("overlay.png", tmp_path / "overlay.png")):
        assert f'"{placeholder}"' in code, placeholder
        code = code.replace(f'"{placeholder}"', repr(str(real)))
    script = textwrap.dedent("""
        import importlib.abc, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision"):
                    raise ImportError(f"{name} is blocked: the device has no torch")
        sys.meta_path.insert(0, NoTorch())
    """) + code + "\nprint('RESULTS', [r.verdict for r in results])\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("backend ort-cpu"), lines[0]
    verdict, score, threshold, total_ms = lines[1].split()
    assert verdict in ("good", "anomalous") and float(score) > 0 and float(threshold) > 0 and float(total_ms) > 0
    assert lines[-1].startswith("RESULTS [") and lines[-1].count("'") == 4
    overlay = cv2.imread(str(tmp_path / "overlay.png"))
    assert overlay is not None and overlay.ndim == 3 and overlay.shape[2] == 3


def test_public_api_is_listed_and_documented():
    import pcedge.runtime as runtime

    for name in ("Detector", "DetectorOptions", "Result", "open_bundle", "read_image", "render_overlay",
                 "open_backend", "make_index", "Scorer", "pack", "unpack", "open_source", "WatchPipeline",
                 "evaluate", "load_category", "BundleError", "BackendUnavailable"):
        assert name in runtime.__all__, name
        assert getattr(runtime, name).__doc__ or callable(getattr(runtime, name)), name
