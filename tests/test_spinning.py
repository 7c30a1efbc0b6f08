"""ONNX Runtime spinning on the single-stream path: the governor's decisions (driven with chosen run times),
the two sessions' bit-identical outputs on real fixture exports, the option's validation, and the watch
pipeline and servers never spinning."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from pcedge.runtime.backends import OrtBackend, open_backend
from pcedge.runtime.bundle import open_bundle
from pcedge.runtime.detector import Detector
from pcedge.runtime.preprocess import read_image
from pcedge.runtime.spin_governor import SpinGovernor, SpinPolicy, check_spinning_mode, typical
from pcedge.runtime.watch.pipeline import WatchOptions, WatchPipeline
from pcedge.runtime.watch.sources import open_source

from conftest import BSD
from test_int8 import int8_bundle  # noqa: F401 (session fixture: the export with INT8 graphs)

PHOTOS = sorted((BSD / "test" / "good").iterdir())[:3] + sorted((BSD / "test" / "pitting").iterdir())[:3]

# Milliseconds per frame, end to end (the governor is fed whole single-stream calls), BSData FP32, 2 cores:
QUIET_PLAIN, QUIET_SPIN = 6.9, 6.2  # quiet: spinning ~10 % faster
BUSY_PLAIN = 9.0  # another process on one core: the plain session slower ...
SLOW_SPIN = 20.0  # ... and the spinning one's slow mode
BUSY_SPIN = (8.2, 8.3, SLOW_SPIN)  # bimodal: a third of its frames in the slow mode


def drive(governor: SpinGovernor, runs: int, plain_ms: float, spin_ms) -> list[bool]:
    """``runs`` runs through the governor; spinning ones take ``spin_ms`` (a number, or a cycle of numbers)."""
    cycle = list(spin_ms) if isinstance(spin_ms, (tuple, list)) else [spin_ms]
    decisions = []
    for i in range(runs):
        spin = governor.should_spin()
        governor.record(spin, cycle[i % len(cycle)] if spin else plain_ms)
        decisions.append(spin)
    return decisions


def test_quiet_measures_the_plain_session_probes_and_then_spins():
    policy = SpinPolicy()
    governor = SpinGovernor(policy)
    decisions = drive(governor, 200, QUIET_PLAIN, QUIET_SPIN)
    assert decisions[: policy.window] == [False] * policy.window  # the plain session measured first
    assert all(decisions[policy.window:])  # the probe won and it never stood down
    assert governor.state == "spin"
    assert (governor.stats.probes_won, governor.stats.probes_lost, governor.stats.alarms) == (1, 0, 0)


def test_a_stray_slow_run_does_not_stand_spinning_down():
    governor = SpinGovernor()
    drive(governor, 40, QUIET_PLAIN, QUIET_SPIN)
    drive(governor, 20, QUIET_PLAIN, [QUIET_SPIN] * 9 + [40.0])  # a page fault now and then
    assert governor.state == "spin" and governor.stats.alarms == 0


def test_contention_stands_down_and_lost_probes_double_the_stand_down_up_to_the_cap():
    policy = SpinPolicy(window=4, first_stand_down=8, max_stand_down=32, settle_runs=16)
    governor = SpinGovernor(policy)
    drive(governor, 40, QUIET_PLAIN, QUIET_SPIN)
    assert governor.state == "spin"
    # Another process takes a core: the spinning runs turn 3x slower; the alarm stands spinning down.
    drive(governor, 2, BUSY_PLAIN, SLOW_SPIN)
    assert governor.state == "plain" and governor.stats.alarms == 1
    assert governor.next_stand_down == 8  # spinning had settled (16 runs without alarm): no doubling
    # Each lost probe: `window` spinning runs, then a stand-down twice as long as the last, capped.
    stand_downs = []
    decisions = drive(governor, 400, BUSY_PLAIN, SLOW_SPIN)
    run = 0
    for spin in decisions:
        if spin:
            if run:
                stand_downs.append(run)
            run = 0
        else:
            run += 1
    assert stand_downs[:4] == [8, 8, 16, 32]  # the alarm's, then each lost probe's
    assert set(stand_downs[4:]) == {32}
    assert governor.stats.probes_won == 1 and governor.stats.probes_lost >= 6
    # Each lost probe costs 1 + early_loss_runs spinning runs (the first after the switch is not compared;
    # 20 ms against 9 is lost early): 12 probes in 400 runs here, ever fewer per run as the stand-downs
    # grow (default cap: 1024 runs).
    assert governor.stats.probes_lost == 12 and sum(decisions) == (1 + policy.early_loss_runs) * 12


def test_bimodal_contention_is_judged_by_the_average_not_the_typical_fast_run():
    governor = SpinGovernor()
    decisions = drive(governor, 300, BUSY_PLAIN, BUSY_SPIN)
    # The spinning runs' median (8.3) beats the plain session's 9.0; their mean (12.2) does not.
    assert typical(BUSY_SPIN * 3) > BUSY_PLAIN > float(np.median(BUSY_SPIN * 3))
    # Only the probes spun, each lost; stand-downs 16, 32, 64, 128 runs: five probes in 300 runs.
    assert governor.stats.probes_won == 0 and governor.stats.probes_lost == 5
    assert sum(decisions) == 5 * (governor.policy.window + 1)


def test_a_lucky_probe_under_contention_is_found_out_and_backs_off():
    policy = SpinPolicy(window=4, first_stand_down=8, max_stand_down=64, settle_runs=32)
    governor = SpinGovernor(policy)
    drive(governor, 4, BUSY_PLAIN, 8.2)
    drive(governor, 5, BUSY_PLAIN, 8.2)  # the probe's runs all fell in the fast mode: won
    assert governor.state == "spin" and governor.stats.probes_won == 1
    drive(governor, 2, BUSY_PLAIN, SLOW_SPIN)
    assert governor.state == "plain" and governor.stats.alarms == 1
    assert governor.next_stand_down == 16  # not settled: the alarm doubles like a lost probe


def test_the_return_to_quiet_is_found_and_resets_the_back_off():
    policy = SpinPolicy(window=4, first_stand_down=8, max_stand_down=64, settle_runs=16)
    governor = SpinGovernor(policy)
    drive(governor, 300, BUSY_PLAIN, SLOW_SPIN)  # long contention: stand-downs at the cap
    assert governor.next_stand_down == 64 and governor.state == "plain"
    decisions = drive(governor, 200, QUIET_PLAIN, QUIET_SPIN)  # quiet again
    # Found within a capped stand-down (two if the quiet began in the middle of a probe, which it then lost).
    assert decisions.index(True) <= 64 + 4 + 64 and all(decisions[-60:])
    assert governor.state == "spin"
    assert governor.next_stand_down == 8  # spinning held for settle_runs: back to the first stand-down


def test_a_uniformly_slower_machine_keeps_spinning_while_it_still_wins():
    governor = SpinGovernor()
    drive(governor, 60, QUIET_PLAIN, QUIET_SPIN)
    # Another job on both cores slows both sessions alike: the alarm may fire, the fresh comparison wins.
    decisions = drive(governor, 300, 1.6 * QUIET_PLAIN, 1.6 * QUIET_SPIN)
    assert governor.state == "spin" and sum(decisions) / len(decisions) > 0.85


def test_the_first_run_after_a_switch_is_not_compared_and_a_probe_must_win_by_the_margin():
    policy = SpinPolicy(window=4, first_stand_down=8)
    governor = SpinGovernor(policy)
    drive(governor, 4, 3.0, 0.0)
    # 4.0 then 2.6: counted, the switch's slow first run would lose the probe (mean 2.95 > 0.9 x 3.0).
    drive(governor, 5, 3.0, [4.0, 2.6, 2.6, 2.6, 2.6])
    assert governor.state == "spin" and governor.stats.probes_won == 1
    close = SpinGovernor(policy)
    drive(close, 4 + 5, 3.0, 2.9)  # 3 % faster: within the margin, not worth the switches
    assert close.state == "plain" and close.stats.probes_lost == 1


def test_typical_leaves_out_one_stray_run_but_not_a_pattern():
    assert typical([2.0] * 7 + [40.0]) == pytest.approx(2.0)  # one stray
    assert typical([2.0] * 6 + [9.0, 9.0]) == pytest.approx(3.75)  # two: contention, all counted
    assert typical([3.0]) == 3.0 and typical([2.0, 9.0]) == pytest.approx(5.5)
    with pytest.raises(ValueError):
        typical([])


@pytest.mark.parametrize("bad, message", [
    (dict(window=1), "window must be at least 2"),
    (dict(slow_ratio=1.0), "slow_ratio must be above 1"),
    (dict(window=8, first_stand_down=8), "must be more than the window"),
    (dict(win_margin=1.0), "win_margin"),
    (dict(first_stand_down=16, max_stand_down=8), "max_stand_down"),
    (dict(settle_runs=0), "settle_runs"),
    (dict(window=4, first_stand_down=8, early_loss_runs=5), "early_loss_runs"),
])
def test_bad_policies_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        SpinPolicy(**bad)


# ----------------------------------------------------------------------------------- the two sessions
def _network_inputs(detector: Detector) -> np.ndarray:
    tensor, _ = detector.input_buffers().prepare([read_image(p) for p in PHOTOS[:2]], [None, None])
    return tensor.copy()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_spinning_and_the_plain_session_give_bit_identical_embeddings(fixture_bundle, int8_bundle, precision):
    bundle = fixture_bundle if precision == "fp32" else int8_bundle
    with Detector.open(bundle, backend="ort-cpu", threads=2, precision=None if precision == "fp32" else "int8",
                       ort_spinning="auto") as detector:
        backend = detector.backend
        assert backend.spinning == "auto" and backend.spinning_session is not None
        plain_options = backend.session.get_session_options()
        spin_options = backend.spinning_session.get_session_options()
        assert plain_options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert spin_options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert spin_options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert plain_options.intra_op_num_threads == spin_options.intra_op_num_threads == 2
        assert backend.session._model_path == backend.spinning_session._model_path
        if precision == "int8":
            assert Path(backend.session._model_path).name == "model_int8_cpu.onnx"
        images = _network_inputs(detector)
        for batch in (images[:1], images):
            plain = backend.session.run(None, {backend.input_name: batch})[0]
            spun = backend.spinning_session.run(None, {backend.input_name: batch})[0]
            assert plain.dtype == np.float32 and np.array_equal(plain, spun)


def test_auto_single_stream_results_equal_the_non_spinning_detectors(fixture_bundle):
    frames = [read_image(p) for p in PHOTOS]
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", threads=2, ort_spinning=False) as off:
        assert off.backend.spinning_session is None and off.spin_governor is None
        reference = [off.run_frames([f])[0] for f in frames]
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", threads=2) as auto:  # the default
        assert auto.options.ort_spinning == "auto" and auto.spin_governor is not None
        assert "spinning during runs while no other process holds a core" in auto.description
        window = auto.spin_governor.policy.window
        results = [auto.run_frames([frames[i % len(frames)]])[0] for i in range(2 * window + 4)]
        runs = auto.backend.runs
        assert runs.plain >= window and runs.spinning >= 1  # measured plain first, then probed
        assert runs.plain + runs.spinning == 2 * window + 4
    for i, result in enumerate(results):
        ref = reference[i % len(frames)]
        assert result.score == ref.score and np.array_equal(result.anomaly_map, ref.anomaly_map, equal_nan=True)


def test_the_detector_feeds_the_governor_whole_calls_per_image(fixture_bundle, monkeypatch):
    """The governor gets each single-stream call's wall time (preprocess to scoring) divided by the batch."""
    frames = [read_image(p) for p in PHOTOS[:4]]
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", threads=2) as detector:
        recorded = []
        original = detector.spin_governor.record
        monkeypatch.setattr(detector.spin_governor, "record",
                            lambda spun, ms: (recorded.append((spun, ms)), original(spun, ms)))
        results = detector.run_frames(frames)
        single = detector.run_frames(frames[:1])[0]
        assert detector.backend.runs.plain == 2 and detector.backend.runs.spinning == 0
    (spun, per_image), (_, one) = recorded
    assert spun is False  # the governor starts by measuring the plain session
    stages = float(np.mean([r.timings.total_ms for r in results]))
    # At least the stages' time per image (they run inside the timed call), and per image, not per call.
    assert 0.99 * stages <= per_image < 2 * stages
    assert one >= 0.99 * single.timings.total_ms


def test_forced_on_always_spins_on_the_single_stream_path(fixture_bundle):
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", threads=2, ort_spinning=True) as on:
        assert on.spin_governor is None and "spinning during runs" in on.description
        for p in PHOTOS[:3]:
            on(p)
        assert (on.backend.runs.plain, on.backend.runs.spinning) == (0, 3)


def test_one_thread_has_nothing_to_spin(fixture_bundle):
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", threads=1) as one:
        assert one.backend.spinning is False and one.backend.spinning_session is None
        one(PHOTOS[0])
        assert one.backend.runs.spinning == 0


@pytest.mark.parametrize("value", ["yes", "on", 1, 0, None, "Auto"])
def test_a_bad_spinning_option_is_a_clear_error(fixture_bundle, value):
    with pytest.raises(ValueError, match=r"ort_spinning must be True, False or 'auto', got"):
        Detector.open(fixture_bundle, backend="ort-cpu", ort_spinning=value)
    with pytest.raises(ValueError, match=r"ort_spinning must be True, False or 'auto'"):
        open_backend("ort-cpu", open_bundle(fixture_bundle), spinning=value)
    assert check_spinning_mode("auto") == "auto" and check_spinning_mode(True) is True


# ----------------------------------------------------------------------------- watch and servers
def test_the_watch_pipeline_never_spins_even_with_spinning_on(fixture_bundle, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, path in enumerate(PHOTOS):
        (folder / f"{i:03d}{path.suffix}").write_bytes(path.read_bytes())
    for mode in ("auto", True):
        with Detector.open(fixture_bundle, backend="ort-cpu", index="auto", threads=2, ort_spinning=mode) as detector:
            source = open_source(str(folder), fps=None, loop=False)
            summary = WatchPipeline(detector, source, WatchOptions(max_frames=len(PHOTOS))).run()
            assert summary.processed == len(PHOTOS)
            assert detector.backend.runs.spinning == 0 and detector.backend.runs.plain >= 1


def test_the_watch_command_opens_its_detector_without_the_spinning_session(fixture_bundle, tmp_path, monkeypatch):
    from pcedge.commands import watch as watch_command

    opened = []
    original = Detector.open.__func__

    def spy(cls, path, options=None, **kwargs):
        detector = original(cls, path, options, **kwargs)
        opened.append(detector.backend)
        return detector

    monkeypatch.setattr(Detector, "open", classmethod(spy))
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / f"000{PHOTOS[0].suffix}").write_bytes(PHOTOS[0].read_bytes())
    parser = argparse.ArgumentParser()
    watch_command.add_arguments(parser)
    args = parser.parse_args([str(fixture_bundle), str(folder), "--backend", "ort-cpu", "--max-frames", "1"])
    assert watch_command.run(args) == 0
    assert len(opened) == 1 and opened[0].spinning is False and opened[0].spinning_session is None


def test_the_servers_embedder_backend_never_spins(fixture_bundle):
    # runtime/serving/python_models.py's EmbedderModel opens OrtBackend(path, "ort-cpu", threads) and calls it.
    backend = OrtBackend(Path(fixture_bundle) / "model.onnx", "ort-cpu", 2)
    assert backend.spinning is False and backend.spinning_session is None
    options = backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # And even a backend with a spinning session does not spin when called as the embedder calls it.
    spinning = OrtBackend(Path(fixture_bundle) / "model.onnx", "ort-cpu", 2, spinning=True)
    tensor = np.zeros((1, 3, 224, 224), dtype=np.float32)
    spinning(tensor)
    assert (spinning.runs.plain, spinning.runs.spinning) == (1, 0)
