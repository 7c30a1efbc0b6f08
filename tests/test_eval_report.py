"""``pcedge eval --report DIR``: figures, overlays and an index.html whose every link resolves to a real image."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np

from pcedge.cli import main

ROOT = Path(__file__).resolve().parents[1]
BSD = ROOT / "fixtures" / "ball_screw_drive"
VOID = {"meta", "img", "br", "hr", "link", "input"}


class PageCheck(HTMLParser):
    """Collects image links and checks that every opened (non-void) element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in VOID:
            self.stack.append(tag)
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def test_report_writes_figures_overlays_and_a_valid_page(fixture_bundle, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", str(fixture_bundle), "--data", str(BSD), "--backend", "ort-cpu", "--index", "exact",
                 "--report", str(out), "--quiet"]) == 0
    assert f"wrote {out / 'index.html'} (3 figures, 8 overlays)" in capsys.readouterr().out
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    check = PageCheck()
    check.feed(page)
    check.close()
    assert not check.errors and not check.stack, (check.errors, check.stack)
    assert check.title == "pcedge eval: ball_screw_drive"
    sources = [img["src"] for img in check.images]
    assert {"roc.png", "pro.png", "scores.png"} <= set(sources)
    assert sum(s.startswith("overlays/fp_") for s in sources) == 4 and sum(s.startswith("overlays/fn_") for s in sources) == 4
    for img in check.images:
        assert img.get("alt"), img
        path = out / img["src"]
        assert path.resolve().is_relative_to(out.resolve()) and path.is_file(), img["src"]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", img["src"]
        pixels = cv2.imread(str(path))
        assert pixels is not None and min(pixels.shape[:2]) > 100 and pixels.std() > 5, img["src"]  # drawn, not blank
    # The overlays are the test images themselves (1130 x 460 frames), and the captions name them.
    overlay = cv2.imread(str(out / "overlays" / "fn_1.png"))
    assert overlay.shape[:2] == (460, 1130)
    assert "(pitting): score" in page and "(good): score" in page
    assert not list(out.rglob(".*.tmp*"))  # no temporary files left


def test_report_reruns_into_its_own_folder_and_refuses_foreign_ones(fixture_bundle, tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    assert main(["eval", str(fixture_bundle), "--data", str(BSD), "--report", str(foreign), "--quiet"]) == 2
    assert "not empty and not a previous pcedge report" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]  # untouched
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["eval", str(fixture_bundle), "--data", str(BSD), "--report", str(a_file), "--quiet"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_score_histogram_draws_the_threshold(fixture_bundle, tmp_path):
    """The dashed threshold line is black on a white figure: some column of the plot area is mostly dark."""
    out = tmp_path / "r"
    assert main(["eval", str(fixture_bundle), "--data", str(BSD), "--report", str(out), "--quiet"]) == 0
    image = cv2.imread(str(out / "scores.png"), cv2.IMREAD_GRAYSCALE)
    dark_per_column = (image < 60).mean(axis=0)
    assert np.sort(dark_per_column)[-3:].min() > 0.3
