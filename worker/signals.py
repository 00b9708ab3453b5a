"""Signals for a main thread that must never deadlock on them.

A Python signal handler runs in the main thread between two bytecodes, possibly while that
thread holds a lock: inside ``threading.Event.wait`` it holds the Event's own (non-reentrant)
lock for a few bytecodes, so a handler that calls ``Event.set()`` on that Event deadlocks the
main thread for good (the class of bug CPython issue 126434 describes for multiprocessing's
Event). The agent's handlers did exactly that; a chaos run once saw an agent ignore SIGTERM for
30 s while its other threads worked on. These handlers take no lock: they note the signal in a
deque (append is atomic) and write a byte to a pipe, which :meth:`SignalInbox.wait` selects on.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections import deque
from types import FrameType


class SignalInbox:
    """Signals received, for the main thread to act on outside the handler."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending: deque[int] = deque()

    def install(self, *signums: signal.Signals) -> None:
        for signum in signums:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)
        with contextlib.suppress(OSError):  # a full pipe already wakes the reader
            os.write(self._w, b"!")

    def wait(self, timeout: float) -> set[int]:
        """The signals received since the last call, waiting up to ``timeout`` seconds for
        one when there are none yet."""
        if not self._pending:
            select.select([self._r], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 512):
                pass
        got: set[int] = set()
        while self._pending:
            got.add(self._pending.popleft())
        return got

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
