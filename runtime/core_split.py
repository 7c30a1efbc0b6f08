"""One frame's CPU work split into independent parts, run on the caller's thread and a few helper threads.

The single-stream :class:`~pcedge.runtime.detector.Detector` owns the machine between frames, so the stages
that would otherwise run on one core (OpenCV's INTER_AREA shrink, the exact index's matrix product on one
BLAS thread) can use the others. The parts are OpenCV and numpy calls that release the GIL, so Python
threads run them truly in parallel. The helpers are created once and live until :meth:`CoreSplit.close`
(a frame's split costs a hand-off of some tens of microseconds, not a thread start). Nothing here is
process-wide: each detector owns its own split, and the pipelined ``watch``, whose stages already overlap
on separate threads, does not use one.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

Part = TypeVar("Part")
Out = TypeVar("Out")


#: Calls in a row whose helper part started only after the caller had finished its own part before the
#: split stands down: the other cores are busy (another process holds them) and the hand-off only adds a
#: wait (measured with another job on the second core throughout: the split then cost 0.1-0.2 ms a frame,
#: results/latency.md). Eight, not fewer: a short burst (BLAS's own threads still spinning after a call)
#: made 3 in a row stand the split down on a quiet machine (benchmarks/bench_core_split.py).
LATE_CALLS_TO_STAND_DOWN = 8

#: Calls run on the caller's thread alone once the split has stood down, before it tries the helpers again.
STAND_DOWN_CALLS = 32


class CoreSplit:
    """The caller's thread plus ``threads - 1`` persistent helper threads.

    :meth:`map` runs the first part on the calling thread (it would wait anyway) and the others on the
    helpers; the results come back in the parts' order and an exception in any part is raised to the
    caller after every part has finished (no part is left writing into memory the caller reuses).
    Several threads may call :meth:`map` at once: their helper parts queue for the same helpers.

    Only while it helps: when a helper's part keeps starting after the caller has already finished its
    own (LATE_CALLS_TO_STAND_DOWN calls in a row), the next STAND_DOWN_CALLS calls run every part on the
    caller's thread, one after the other, and then the helpers are tried again. The parts and their
    results are the same either way; only where they run changes.
    """

    def __init__(self, threads: int):
        if threads < 2:
            raise ValueError(f"a split needs at least 2 threads, got {threads}")
        self.threads = int(threads)
        self._helpers: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=self.threads - 1,
                                                                     thread_name_prefix="pcedge-split")
        self._lock = threading.Lock()  # guards the two counters below (several callers may map at once)
        self._late_in_a_row = 0
        self._alone_left = 0  # calls still to run on the caller's thread alone
        self.stood_down = 0  # how many times the split stood down (for tests and benchmarks)

    def map(self, work: Callable[[Part], Out], parts: Sequence[Part]) -> list[Out]:
        """``[work(p) for p in parts]``, the parts run concurrently (at most ``threads`` at a time)."""
        if self._helpers is None:
            raise RuntimeError("this CoreSplit is closed")
        if len(parts) <= 1 or self._take_alone_call():
            return [work(p) for p in parts]
        started: list[float] = []

        def helper_part(part: Part) -> Out:
            started.append(time.perf_counter())  # list.append is atomic under the GIL
            return work(part)

        futures = [self._helpers.submit(helper_part, p) for p in parts[1:]]
        first: list[Out] = []
        error: BaseException | None = None
        try:
            first.append(work(parts[0]))
        except BaseException as exc:  # re-raised below, after the helpers' parts are done
            error = exc
        own_done = time.perf_counter()
        rest = []
        for future in futures:
            try:
                rest.append(future.result())
            except BaseException as exc:
                error = error or exc
        self._record(late=any(t > own_done for t in started))
        if error is not None:
            raise error
        return first + rest

    def _take_alone_call(self) -> bool:
        with self._lock:
            if self._alone_left > 0:
                self._alone_left -= 1
                return True
            return False

    def _record(self, late: bool) -> None:
        with self._lock:
            self._late_in_a_row = self._late_in_a_row + 1 if late else 0
            if self._late_in_a_row >= LATE_CALLS_TO_STAND_DOWN:
                self._late_in_a_row = 0
                self._alone_left = STAND_DOWN_CALLS
                self.stood_down += 1

    def close(self) -> None:
        """Stop the helper threads (waits for parts in flight); idempotent."""
        if self._helpers is not None:
            self._helpers.shutdown(wait=True)
            self._helpers = None

    def __enter__(self) -> "CoreSplit":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
