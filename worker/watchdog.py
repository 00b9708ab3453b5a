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

A job the agent started but had not reported yet (``track`` lines are gathered per reactor turn,
and the agent can die between a spawn and the write) is found another way: every job's
environment carries ``CRONSUL_WATCHDOG=<token>``, this watchdog's random token (its argv), and
when it kills, it also kills the process group of every process whose environment shows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

# The environment variable every job gets, holding its agent's watchdog token.
TOKEN_ENV = "CRONSUL_WATCHDOG"
# How the agent hands the watchdog its token (not TOKEN_ENV: the watchdog is no job to kill).
OWN_TOKEN_ENV = "CRONSUL_WATCHDOG_TOKEN"


def _kill_groups(groups: set[int], token: str | None = None, why: str = "",
                 node: str = "") -> None:
    if token:
        groups |= _marked_groups(token)
    killed = []
    for pgid in sorted(groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
            killed.append(pgid)
    groups.clear()
    if killed and why:
        _log("watchdog_killed", node, reason=why, process_groups=killed[:50], count=len(killed))


def _log(event: str, node: str, **fields: object) -> None:
    """One JSON line on stderr (the agent's, so the journal's), as the agent writes them: a
    kill by the watchdog is the one thing that happens to a run with no agent to say so."""
    line = {"node": node, **fields, "event": event, "level": "warning",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()


def _marked_groups(token: str, proc: str = "/proc") -> set[int]:
    """The process groups of the processes whose (initial) environment carries ``token``."""
    marker = f"{TOKEN_ENV}={token}".encode()
    found: set[int] = set()
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"{proc}/{pid}/stat", "rb") as f:
                pgid = int(f.read().rsplit(b")", 1)[1].split()[2])
        except (OSError, ValueError, IndexError):  # gone, or not ours to read
            continue
        if pgid > 1 and pgid != os.getpgrp():
            found.add(pgid)
    return found


def serve(fd: int = 0, token: str | None = None, node: str = "") -> int:
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
                _kill_groups(groups, token, "the agent is gone (its pipe closed): its jobs die "
                             "with it", node)
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
            _kill_groups(groups, token, "the agent did not renew its runs' leases in time "
                         "(frozen, or Redis unreachable): killed before the leases lapse, so "
                         "no run executes on two nodes at once", node)
            deadline = None


class Watchdog:
    """The agent's handle on its watchdog process (thread-safe)."""

    def __init__(self, node: str = "") -> None:
        self._node = node  # named in the watchdog's log lines
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending: list[str] = []  # track/untrack lines not written yet
        self._defer: Callable[[Callable[[], None]], None] | None = None
        # Put in every job's environment (TOKEN_ENV): the watchdog kills what carries it too.
        self.token = os.urandom(12).hex()

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
        # The token in the environment, not argv: `ps` shows every user a process's argv.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "worker.watchdog", "-", self._node],
            stdin=subprocess.PIPE, env={**os.environ, OWN_TOKEN_ENV: self.token},
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
    # "-": the token is in OWN_TOKEN_ENV (argv is public); an argv token still works.
    argv_token = sys.argv[1] if len(sys.argv) > 1 else None
    sys.exit(serve(token=os.environ.get(OWN_TOKEN_ENV) if argv_token == "-" else argv_token,
                   node=sys.argv[2] if len(sys.argv) > 2 else ""))
