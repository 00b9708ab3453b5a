"""Running one job command: argv without a shell, its own process group, timeout TERM->KILL."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
# Output lines also go to the agent's log (run id bound) up to this many per run, so a chatty
# job cannot flood the journal; the recorded tail is unaffected.
LOGGED_LINES_MAX = 200


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

    def __init__(self, watchdog: Watchdog | None, kill_grace: float,
                 output_limit: int = OUTPUT_LIMIT, log: Any = None) -> None:
        self._watchdog = watchdog
        self._kill_grace = kill_grace
        self._output_limit = output_limit
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = threading.Event()

    def run(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
            timeout: float, user: str | None = None) -> Outcome:
        start = time.monotonic()
        try:
            identity = _identity(user)
        except (KeyError, PermissionError) as exc:
            return Outcome(None, None, False, 0.0, "", 0, str(exc).strip("'\""))
        try:
            proc = subprocess.Popen(
                list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, **identity,
            )
        except OSError as exc:
            return Outcome(None, None, False, 0.0, "", 0, f"cannot start {argv[0]!r}: {exc}")
        self._proc = proc
        if self._watchdog is not None:
            self._watchdog.track(proc.pid)
        tail = _Tail(self._output_limit, self._log)
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


def root_refusal(user: str | None, allow_root: bool, python_callable: bool,
                 euid: int) -> str | None:
    """Why a job must not start as this agent (euid), or None. An agent running as root runs a
    job as root only when the job says ``allow_root = true``; a callable job runs inside the
    agent's Python pool, as the agent's own user, so it cannot switch to ``user``."""
    if python_callable and user is not None and _uid(user) != euid:
        return (f"refused: callable jobs run in the agent's Python pool as the agent's user "
                f"and cannot switch to user {user!r}; use a command job for that")
    if euid != 0 or allow_root:
        return None
    if python_callable:
        return ("refused: the agent runs as root and callable jobs run as the agent's user; "
                "set allow_root = true on the job, or run the agent unprivileged")
    if user is None or _uid(user) == 0:
        return (f"refused to run as root: the agent runs as root and the job sets "
                f"{'no user' if user is None else f'user = {user!r}'}; set user = \"<name>\" "
                "(or allow_root = true if it really needs root)")
    return None


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None  # reported when the run tries to switch to it


def _identity(user: str | None) -> dict[str, Any]:
    """Popen arguments that drop to ``user`` (its primary group, no supplementary groups)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)  # KeyError: unknown user
    if os.geteuid() != 0:
        if entry.pw_uid == os.geteuid():
            return {}
        raise PermissionError(f"cannot run as user {user!r}: the agent is not running as root")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Tail:
    def __init__(self, limit: int, log: Any = None) -> None:
        self._limit = limit
        self._buf = bytearray()
        self.total = 0
        self._log = log
        self._logged = 0
        self._partial = b""

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
            if self._log is not None and self._logged < LOGGED_LINES_MAX:
                self._stream_lines(chunk)
            if len(self._buf) > 2 * self._limit:
                del self._buf[: len(self._buf) - self._limit]
        stream.close()

    def _stream_lines(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines[: LOGGED_LINES_MAX - self._logged]:
            self._log.info("run_output", line=line.decode("utf-8", errors="replace")[:1000])
        self._logged += len(lines)
        self._partial = self._partial[-4096:]

    def text(self) -> str:
        if self._limit == 0:
            return ""
        return bytes(self._buf[-self._limit:]).decode("utf-8", errors="replace")
