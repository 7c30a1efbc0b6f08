"""Session fixtures: bundles exported once from the repository's own fixture images (never ../shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
BSD = FIXTURES / "ball_screw_drive"
PCB = FIXTURES / "pcb"


def export(data: Path, out: Path, **overrides):
    from pcedge.export.fit import ExportConfig, export_bundle

    # The INT8 graph and its gate cost seconds per export: only the tests that ask for them (int8=True) pay.
    config = ExportConfig(data=data, output=out, progress=False, threads=2, **{"int8": False, **overrides})
    return export_bundle(config)


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """``make(name, data, **ExportConfig overrides) -> ExportReport``, cached per name for the session."""
    cache: dict[str, object] = {}
    root = tmp_path_factory.mktemp("bundles")

    def make(name: str, data: Path = BSD, **overrides):
        if name not in cache:
            cache[name] = export(data, root / f"{name}.pcedge", **overrides)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def fixture_report(bundle_factory):
    """Default export of fixtures/ball_screw_drive (EfficientNet-Lite0, default coreset and geometry)."""
    return bundle_factory("bsd_default")


@pytest.fixture(scope="session")
def fixture_bundle(fixture_report) -> Path:
    return fixture_report.bundle


@pytest.fixture(scope="session")
def pcb_bundle(bundle_factory) -> Path:
    """Default export of fixtures/pcb (grayscale-looking binarised PCB crops stored as PNG)."""
    return bundle_factory("pcb_default", PCB).bundle


@pytest.fixture(scope="session")
def coreset10_bundle(bundle_factory) -> Path:
    """fixtures/ball_screw_drive with a 10 % greedy coreset (the ratio issue 5's accuracy check names)."""
    return bundle_factory("bsd_coreset10", coreset=0.1).bundle


@pytest.fixture(scope="session")
def full_bank_bundle(bundle_factory) -> Path:
    """fixtures/ball_screw_drive with the whole memory bank (no coreset): the reference configuration."""
    return bundle_factory("bsd_full", coreset=1.0).bundle
