"""Running one job command: argv without a shell, its own process group, timeout TERM->KILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from worker.watchdog import Watchdog

# What of the agent's own environment a job inherits; everything else comes from the job's
# `env` table and the CRONSUL_* variables. Like cron, a job does not see the agent's secrets
# (CONSUL_HTTP_TOKEN, AWS keys) unless its config passes them on explicitly.
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "SHELL", "TMPDIR")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Output kept per run (the tail); the rest is counted but dropped so a chatty job cannot
# exhaust the agent's memory.
OUTPUT_LIMIT = 64 * 1024
# How long to wait for the output pipe to close after the process group is gone.
PIPE_DRAIN_S = 2.0


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    timed_out: bool
    duration_s: float
    output: str
    output_bytes: int
    error: str | None = None  # the command could not be started

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None


def job_environment(agent_env: Mapping[str, str], job_env: Sequence[tuple[str, str]],
                    cronsul: Mapping[str, str]) -> dict[str, str]:
    env = {k: agent_env[k] for k in BASE_ENV if k in agent_env}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(job_env)
    env.update(cronsul)
    return env


class Execution:
    """One running process group; ``stop()`` may be called from another thread."""

    def __init__(self, watchdog: Watchdog | None, kill_grace: float) -> None:
        self._watchdog = watchdog
        self._kill_grace = kill_grace
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = threading.Event()

    def run(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
            timeout: float) -> Outcome:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            return Outcome(None, None, False, 0.0, "", 0, f"cannot start {argv[0]!r}: {exc}")
        self._proc = proc
        if self._watchdog is not None:
            self._watchdog.track(proc.pid)
        tail = _Tail(OUTPUT_LIMIT)
        reader = threading.Thread(target=tail.drain, args=(proc,), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self._terminate(proc)
        finally:
            # Kill stragglers the job left in its group (a backgrounded child), then forget it.
            _killpg(proc.pid, signal.SIGKILL)
            if self._watchdog is not None:
                self._watchdog.untrack(proc.pid)
        reader.join(PIPE_DRAIN_S)
        code = proc.returncode
        return Outcome(
            exit_code=code if code is not None and code >= 0 else None,
            signal=-code if code is not None and code < 0 else None,
            timed_out=timed_out,
            duration_s=time.monotonic() - start,
            output=tail.text(),
            output_bytes=tail.total,
        )

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self._kill_grace)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """Stop the run now (its lease was lost): TERM, grace, KILL, from any thread."""
        proc = self._proc
        if proc is not None and proc.poll() is None and not self._stopped.is_set():
            self._stopped.set()
            threading.Thread(target=self._terminate, args=(proc,), daemon=True).start()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Tail:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self.total = 0

    def drain(self, proc: subprocess.Popen[bytes]) -> None:
        stream = proc.stdout
        if stream is None:
            return
        fd = stream.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.total += len(chunk)
            self._buf += chunk
            if len(self._buf) > 2 * self._limit:
                del self._buf[: len(self._buf) - self._limit]
        stream.close()

    def text(self) -> str:
        return bytes(self._buf[-self._limit:]).decode("utf-8", errors="replace")
