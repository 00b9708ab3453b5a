"""A tiny companion process that kills job process groups when the agent cannot vouch for them.

The agent may be killed (SIGKILL) or frozen (SIGSTOP, a VM pause) while its jobs keep running.
A frozen agent renews no run lease, so after the visibility timeout another node re-delivers the
run: the frozen node's copy must be dead by then. This process is not frozen with the agent. It
reads commands on stdin and kills every tracked process group

* when stdin reaches EOF (the agent died, however it died), or
* when the agent's deadline passes (the agent set it from its last successful lease renewal,
  minus a margin, so the kill always happens before the lease can lapse).

Commands, one per line: ``track <pgid>``, ``untrack <pgid>``, ``deadline <monotonic seconds>``
(``deadline none`` clears it). CLOCK_MONOTONIC is shared by all processes on the host.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable


def _kill_groups(groups: set[int]) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    groups.clear()


def serve(fd: int = 0) -> int:
    """The watchdog loop. Returns the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the agent, not us
    groups: set[int] = set()
    deadline: float | None = None
    buffer = b""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                _kill_groups(groups)
                return 0
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                verb, _, arg = line.decode(errors="replace").strip().partition(" ")
                if verb == "track":
                    groups.add(int(arg))
                elif verb == "untrack":
                    groups.discard(int(arg))
                elif verb == "deadline":
                    deadline = None if arg == "none" else float(arg)
        if deadline is not None and time.monotonic() >= deadline:
            _kill_groups(groups)
            deadline = None


class Watchdog:
    """The agent's handle on its watchdog process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending: list[str] = []  # track/untrack lines not written yet
        self._defer: Callable[[Callable[[], None]], None] | None = None

    def defer_writes(self, schedule: Callable[[Callable[[], None]], None]) -> None:
        """Gather track/untrack lines and write them with one write: ``schedule(flush)`` must
        run ``flush`` soon (a reactor's call_soon: at the end of its current turn, so a busy
        node pays one pipe write and one watchdog wake-up per turn, not two per run)."""
        self._defer = schedule

    def _queue(self, line: str) -> None:
        with self._lock:
            self._pending.append(line)
            first = len(self._pending) == 1
        if self._defer is None:
            self.flush()
        elif first:
            self._defer(self.flush)

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
        if lines:
            self._send("\n".join(lines))

    def start(self) -> None:
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        # Own session: a ^C in the agent's terminal must not kill the watchdog before the agent.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "worker.watchdog"], stdin=subprocess.PIPE,
            start_new_session=True, close_fds=True,
        )

    def _send(self, line: str) -> None:
        with self._lock:
            for _ in range(2):
                proc = self._proc
                if proc is None or proc.stdin is None or proc.poll() is not None:
                    self._spawn()
                    continue
                try:
                    proc.stdin.write(line.encode() + b"\n")
                    proc.stdin.flush()
                    return
                except BrokenPipeError:
                    self._spawn()

    def track(self, pgid: int) -> None:
        self._queue(f"track {pgid}")

    def untrack(self, pgid: int) -> None:
        self._queue(f"untrack {pgid}")

    def deadline(self, monotonic_deadline: float | None) -> None:
        self._send("deadline none" if monotonic_deadline is None
                   else f"deadline {monotonic_deadline:.3f}")

    def stop(self) -> None:
        """Close stdin: the watchdog kills what is still tracked and exits."""
        self.flush()
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(serve())
