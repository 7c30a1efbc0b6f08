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

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

Part = TypeVar("Part")
Out = TypeVar("Out")


class CoreSplit:
    """The caller's thread plus ``threads - 1`` persistent helper threads.

    :meth:`map` runs the first part on the calling thread (it would wait anyway) and the others on the
    helpers; the results come back in the parts' order and an exception in any part is raised to the
    caller after every part has finished (no part is left writing into memory the caller reuses).
    Several threads may call :meth:`map` at once: their helper parts queue for the same helpers.
    """

    def __init__(self, threads: int):
        if threads < 2:
            raise ValueError(f"a split needs at least 2 threads, got {threads}")
        self.threads = int(threads)
        self._helpers: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=self.threads - 1,
                                                                     thread_name_prefix="pcedge-split")

    def map(self, work: Callable[[Part], Out], parts: Sequence[Part]) -> list[Out]:
        """``[work(p) for p in parts]``, the parts run concurrently (at most ``threads`` at a time)."""
        if self._helpers is None:
            raise RuntimeError("this CoreSplit is closed")
        if len(parts) <= 1:
            return [work(p) for p in parts]
        futures = [self._helpers.submit(work, p) for p in parts[1:]]
        first: list[Out] = []
        error: BaseException | None = None
        try:
            first.append(work(parts[0]))
        except BaseException as exc:  # re-raised below, after the helpers' parts are done
            error = exc
        rest = []
        for future in futures:
            try:
                rest.append(future.result())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return first + rest

    def close(self) -> None:
        """Stop the helper threads (waits for parts in flight); idempotent."""
        if self._helpers is not None:
            self._helpers.shutdown(wait=True)
            self._helpers = None

    def __enter__(self) -> "CoreSplit":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
