"""A bounded, closable hand-off between two stages of the watch pipeline."""

from __future__ import annotations

import collections
import threading
from typing import Any


END = object()  # Channel.get(): the channel is closed and empty
EMPTY = object()  # Channel.get(timeout): nothing arrived in time


class Channel:
    """A bounded hand-off between two stages.

    :meth:`put` waits for room (every frame kept); :meth:`put_newest` never waits and returns the items it
    pushed out to make room (newest wins); :meth:`close` ends the stream (``get`` returns ``END`` once
    empty); :meth:`cancel` releases blocked puts, which then return False.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"channel capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._cancelled = False

    def put(self, item: Any) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: len(self._items) < self.capacity or self._cancelled)
            if self._cancelled:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def put_newest(self, item: Any) -> list:
        with self._cond:
            displaced = []
            while len(self._items) >= self.capacity:
                displaced.append(self._items.popleft())
            self._items.append(item)
            self._cond.notify_all()
            return displaced

    def get(self, timeout: float | None = None) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return EMPTY
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return END

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list:
        """Take everything still waiting (after the stages have stopped)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

