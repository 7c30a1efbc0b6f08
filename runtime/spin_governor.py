"""Whether the single-stream path's next frame should run the backbone on ONNX Runtime's spinning session.

ONNX Runtime's intra-op threads can busy-wait between the ops of a run (``allow_spinning``, stopped when the
run returns: ``force_spinning_stop``). When the detector owns the machine that saves 0.5-0.7 ms of a 2.5-3.5 ms
backbone; when another process holds one of the cores, the spinning thread fights it for that core and the
runs turn bimodal: most as fast as when quiet, some 3-5x slower (results/latency_spinning.md, a busy process
beside it: FP32 median 8.47 against 9.62 ms, but p95 15.6 against 10.8; in one INT8 round 3.8 ms slower
outright); with both cores loaded by other work (an earlier row-by-row run of bench_spinning.py, load
3.5-4) spinning was 5-10 ms slower.

:class:`SpinGovernor` decides frame by frame from the frames' own wall times (the whole single-stream call,
per image: under contention spinning also slows the stages after the backbone -- the exact index's split
helper competes with the spinning thread; in an interleaved ad-hoc run at load ~3.5, INT8, a busy process
beside it, the index took 5.5 ms after spinning runs against 2.9 -- so the backbone's own time would
understate the cost); nothing is read from the system:

- it starts with ``window`` runs of the plain (non-spinning) session, then *probes*: ``window`` spinning
  runs (lost after ``early_loss_runs`` when those are already far slower). The probe wins when its typical time (:func:`typical`: the mean, one stray run left out) is below
  the plain runs' just before it by ``win_margin``; then the governor spins (the first run after a switch
  of session is slower, so it is not compared);
- while spinning it keeps the lowest typical time of the last ``window`` spinning runs since the probe (the
  quiet level); when the current typical time exceeds ``slow_ratio`` times that level (another process
  took a core: a third of the runs 3x slower) or the plain session's time before the probe, it *stands
  down*: the next runs use the plain session, then it probes again;
- a lost probe doubles the next stand-down (up to ``max_stand_down``), so a long contended period costs one
  probe per ever longer stretch of plain runs; so does an alarm soon after a won probe (a lucky probe:
  its few runs all fell in the fast mode). Once spinning has held for ``settle_runs`` runs the length goes
  back to ``first_stand_down``, so a return to quiet is found within one (capped) stand-down.

The decision is a comparison of the two sessions measured under the same conditions (the plain runs of a
stand-down and the probe that follows it), so a machine that is uniformly slower (another engineer's job
on both cores) does not by itself turn spinning off; the slow-ratio alarm only decides when to compare
again. The governor holds no clock: the caller times the frames and passes milliseconds per image to
:meth:`SpinGovernor.record`, so tests drive it with chosen figures. :class:`SpinChoice` is what a
detector holds: never, always, or a governor. One per detector; a lock makes it safe for several threads
that run frames at once. Below, "run" means one single-stream call (a frame, or a batch timed per image).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Sequence

#: The values ``DetectorOptions.ort_spinning`` takes: never, always (the single-stream path), or governed.
SPINNING_MODES = (False, True, "auto")


def check_spinning_mode(value: object) -> bool | str:
    """``value`` if it is one of :data:`SPINNING_MODES`, else ``ValueError`` saying what is accepted."""
    # `is`, not `in`: 1 == True and 0 == False, and an integer is not what the option means.
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f"ort_spinning must be True, False or 'auto', got {value!r}")


#: A run more than this many times the window's median is far out: alone, a stray (ignored); two or more, a pattern.
STRAY_RATIO = 2.0


def typical(times_ms: Sequence[float]) -> float:
    """The runs' mean, ignoring one stray: when exactly one run is more than :data:`STRAY_RATIO` times the
    median (a page fault, a session's first run allocating its buffers) it is left out; two or more such
    runs are what a contended spinning session looks like and all count. Not the median: with a third of
    the runs 3x slower the median barely moves while the average cost grows by half; not a plain trimmed
    mean either: dropping the largest of 2-3 slow runs in 8 hides most of that cost."""
    if not times_ms:
        raise ValueError("no run times")
    ordered = sorted(times_ms)
    n = len(ordered)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    if n > 2 and ordered[-1] > STRAY_RATIO * median and ordered[-2] <= STRAY_RATIO * median:
        return sum(ordered[:-1]) / (n - 1)
    return sum(ordered) / n


@dataclass(frozen=True)
class SpinPolicy:
    """How the governor compares and backs off (counts are backbone runs, i.e. single-stream calls)."""

    # Runs per comparison: the plain runs before a probe, the probe's spinning runs, and the spinning runs
    # the alarm watches. Eight: enough that one stray run is trimmed away and a contended session's slow
    # third shows; few enough that a probe under contention costs ~8 slow runs.
    window: int = 8
    # Spinning's typical time this far above its quiet level raises the alarm. Quiet runs vary by ~5 %
    # (p90/p50 1.03 on BSData); contention lifts the typical time 1.5-2x.
    slow_ratio: float = 1.3
    # A probe must beat the plain session by this fraction. Quiet, spinning makes a frame 9-11 % faster
    # (BSData: FP32 7.11 -> 6.35 ms, INT8 6.13 -> 5.57); under contention the two sessions' averages come within
    # a few per cent of each other, and flipping between them then costs more than either: the first run
    # after a switch of session is ~1 ms slower (its pool's thread wakes up, its weights are out of cache;
    # measured, FP32, 2 cores).
    win_margin: float = 0.05
    # A probe is lost early once this many of its runs are on average `slow_ratio` times the plain session's:
    # under heavy contention (spinning 1.5-2x slower end to end) a probe then costs 4 runs, not window + 1.
    early_loss_runs: int = 3
    # Plain runs after the alarm or the first lost probe (more than `window`: the probe compares with them,
    # and the first run after a switch is not counted).
    first_stand_down: int = 16
    # Longest stand-down after repeated lost probes: ~1000 runs is a few seconds at full rate, so a long
    # contended period costs under 1 % of its runs in probes, and quiet is found again within seconds.
    max_stand_down: int = 1024
    # Spinning runs without an alarm after which a won probe counts as a return to quiet and the stand-down
    # length goes back to first_stand_down. Until then an alarm doubles it like a lost probe: under
    # contention a third of the spinning runs are slow, so now and then a probe's few runs are all fast
    # and it wins by luck (measured: 7 of 8 probes won that way in a 330-frame contended run).
    settle_runs: int = 64

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"SpinPolicy.window must be at least 2, got {self.window}")
        if not self.slow_ratio > 1.0:
            raise ValueError(f"SpinPolicy.slow_ratio must be above 1, got {self.slow_ratio}")
        if not 0.0 <= self.win_margin < 1.0:
            raise ValueError(f"SpinPolicy.win_margin must be in [0, 1), got {self.win_margin}")
        if self.first_stand_down <= self.window:
            raise ValueError(f"SpinPolicy.first_stand_down ({self.first_stand_down}) must be more than the window "
                             f"({self.window}): the probe compares with the plain runs of the stand-down")
        if not 1 <= self.early_loss_runs <= self.window:
            raise ValueError(f"SpinPolicy.early_loss_runs must be between 1 and the window ({self.window}), "
                             f"got {self.early_loss_runs}")
        if self.settle_runs < 1:
            raise ValueError(f"SpinPolicy.settle_runs must be at least 1, got {self.settle_runs}")
        if self.max_stand_down < self.first_stand_down:
            raise ValueError(f"SpinPolicy.max_stand_down ({self.max_stand_down}) must be at least "
                             f"first_stand_down ({self.first_stand_down})")


@dataclass
class SpinStats:
    """What the governor has done (for tests, benchmarks and ``--verbose``-style reports)."""

    spinning_runs: int = 0
    plain_runs: int = 0
    probes_won: int = 0
    probes_lost: int = 0
    alarms: int = 0  # stand-downs because spinning became slow


class SpinGovernor:
    """Per run: spin or not (:meth:`should_spin`), then the run's time (:meth:`record`). See the module."""

    PLAIN, PROBE, SPIN = "plain", "probe", "spin"

    def __init__(self, policy: SpinPolicy | None = None):
        self.policy = policy or SpinPolicy()
        self.stats = SpinStats()
        self._lock = threading.Lock()
        w = self.policy.window
        self._plain: deque[float] = deque(maxlen=w)  # the latest plain runs (ms per image)
        self._spin: deque[float] = deque(maxlen=w)  # the latest spinning runs since the probe was won
        self._probe: list[float] = []
        self._state = self.PLAIN
        self._plain_left = w  # start by measuring the plain session, then probe
        self._next_stand_down = self.policy.first_stand_down
        self._quiet_level = float("inf")  # spinning's lowest typical time since the probe was won
        self._plain_level = float("inf")  # the plain session's typical time when the probe was won
        self._spun_since_win = 0
        self._last_spun = False  # the session of the latest run: the first run after a switch is not compared

    @property
    def state(self) -> str:
        """``plain`` (standing down), ``probe`` or ``spin``."""
        return self._state

    @property
    def next_stand_down(self) -> int:
        """Plain runs the next lost probe or alarm will cost."""
        return self._next_stand_down

    def should_spin(self) -> bool:
        """Whether the next run should use the spinning session."""
        with self._lock:
            return self._state != self.PLAIN

    def record(self, spun: bool, ms_per_image: float) -> None:
        """The run's wall time per image; moves the governor on (a run decided before a change of state,
        by another thread, only adds its time)."""
        with self._lock:
            # The first run after a switch pays for the switch (~1 ms): counted, but not compared.
            switched, self._last_spun = spun != self._last_spun, spun
            if spun:
                self.stats.spinning_runs += 1
                if not switched:
                    self._record_spinning(ms_per_image)
            else:
                self.stats.plain_runs += 1
                if not switched:
                    self._plain.append(ms_per_image)
                if self._state == self.PLAIN:
                    self._plain_left -= 1
                    if self._plain_left <= 0:
                        self._state, self._probe = self.PROBE, []

    def _record_spinning(self, ms: float) -> None:
        if self._state == self.PROBE:
            self._probe.append(ms)
            early = (len(self._probe) == self.policy.early_loss_runs and self._plain
                     and typical(self._probe) > self.policy.slow_ratio * typical(self._plain))
            if early or len(self._probe) >= self.policy.window:
                self._judge_probe()
        elif self._state == self.SPIN:
            self._spin.append(ms)
            self._spun_since_win += 1
            if self._spun_since_win == self.policy.settle_runs:
                self._next_stand_down = self.policy.first_stand_down  # spinning held: quiet again
            level = typical(self._spin)
            self._quiet_level = min(self._quiet_level, level)
            # Slower than its own quiet level by the ratio, or slower than the plain session was just
            # before the probe: either way, time to compare the two again.
            if level > self.policy.slow_ratio * self._quiet_level or level > self._plain_level:
                self.stats.alarms += 1
                self._stand_down(settled=self._spun_since_win >= self.policy.settle_runs)

    def _judge_probe(self) -> None:
        probe = typical(self._probe)
        plain = typical(self._plain) if self._plain else float("inf")
        if probe < (1.0 - self.policy.win_margin) * plain:
            self.stats.probes_won += 1
            self._state = self.SPIN
            self._spin.clear()
            self._spin.extend(self._probe)
            self._quiet_level, self._plain_level = probe, plain
            self._spun_since_win = 0
        else:
            self.stats.probes_lost += 1
            self._stand_down(settled=False)

    def _stand_down(self, settled: bool) -> None:
        """Plain runs for the current stand-down length; unless spinning had settled, the next is doubled."""
        self._state = self.PLAIN
        self._plain_left = self._next_stand_down
        if not settled:
            self._next_stand_down = min(2 * self._next_stand_down, self.policy.max_stand_down)
        self._spin.clear()
        self._probe = []


class SpinChoice:
    """What a detector's single-stream path runs: never the spinning session (``False``), always (``True``)
    or as a :class:`SpinGovernor` decides (``"auto"``); ``mode`` is the backend's (``OrtBackend.spinning``:
    False when it has no spinning session)."""

    def __init__(self, mode: bool | str, policy: SpinPolicy | None = None):
        self.mode = check_spinning_mode(mode)
        self.governor = SpinGovernor(policy) if mode == "auto" else None

    def should_spin(self) -> bool:
        if self.governor is not None:
            return self.governor.should_spin()
        return self.mode is True

    def record(self, spun: bool, ms_per_image: float) -> None:
        """The frame's wall time per image (only a governor uses it)."""
        if self.governor is not None:
            self.governor.record(spun, ms_per_image)
