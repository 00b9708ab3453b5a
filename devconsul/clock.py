"""The dev server's clock: monotonic time that the control API can step forward.

Every deadline the server keeps (session TTLs, check TTLs, lock-delays) is measured on this
clock, so ``PUT /_dev/clock?step=30s`` makes them fire as if 30 s had passed. Blocking-query
waits use real time: a client's wait is its own business.
"""

from __future__ import annotations

import threading
import time


class Clock:
    """Monotonic seconds plus an offset that only grows (stepping back is refused)."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return time.monotonic() + self._offset

    def step(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("the clock can only be stepped forward")
        with self._lock:
            self._offset += seconds
            return self._offset

    @property
    def offset(self) -> float:
        with self._lock:
            return self._offset


class ManualClock(Clock):
    """A clock that moves only when told to (for pure unit tests of the state machine)."""

    def __init__(self, start: float = 1000.0) -> None:
        super().__init__()
        self._now = start

    def now(self) -> float:
        return self._now + self.offset
