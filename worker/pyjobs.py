"""Python callable jobs: a pool of warm worker processes, isolated from the agent.

A job with ``callable = "package.module:function"`` runs in one of ``size`` long-lived worker
processes (:mod:`worker.pyworker`), each in its own session and tracked by the agent's watchdog,
so a segfault, ``os._exit``, hang or memory blow-up in a job costs that worker process, never the
agent. The agent talks to each worker over a socketpair with length-prefixed JSON frames; a run
is one frame each way, so its overhead is tens of microseconds, not a process start.

* Timeout (or :meth:`PyExecution.stop`, when the run's lease is lost): the worker's process
  group gets SIGKILL at once (a Python callable has no TERM handler to honour a grace period),
  the run is recorded as timed out and a replacement worker is started.
* Crash: the run fails with the worker's exit code or signal and whatever it wrote to fds 1/2
  (the faulthandler traceback of a segfault); the worker is replaced.
* Memory: ``max_rss_mb`` becomes RLIMIT_AS in each worker (address space, not RSS: the closest
  limit a process can set on itself), so a blow-up raises MemoryError in the job, which fails the
  run; that worker is then retired. Workers also set ``oom_score_adj`` to 1000 so the kernel's OOM
  killer picks them before the agent.
* Environment: a worker starts with ``env`` (default: the agent's BASE_ENV variables only, like
  shell jobs, so jobs do not see the agent's secrets); each run's ``env`` is laid over it in
  ``os.environ`` for the run (CRONSUL_* included), see :mod:`worker.pyworker`.
* Output: ``sys.stdout``/``sys.stderr`` are captured per run, plus what reached fds 1/2; the
  return value's repr (if not None) is appended as ``return value: ...``; an exception's type,
  message and traceback tail become ``Outcome.error`` with exit code 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import keyword
import math
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError, CronsulError
from worker.executor import BASE_ENV, OUTPUT_LIMIT, Outcome
from worker.pyworker import FrameError, Inbox, encode
from worker.watchdog import Watchdog

# The directory holding the `worker` package, so a worker process finds worker.pyworker even
# when the agent's working directory is elsewhere; the agent's full sys.path follows in the
# first frame (targets are imported the way the agent itself would import them).
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
BOOTSTRAP = (f"import sys; sys.path.insert(0, {PACKAGE_ROOT!r}); "
             "from worker.pyworker import main; main(sys.argv)")
# `ps` shows this in a worker's command line.
PROCESS_TAG = "cronsul-pyworker"
# How long start() waits for a worker to import its module and say it is ready.
START_TIMEOUT_S = 30.0
# How long an idle worker gets to exit by itself after its socket closes (stop) before SIGKILL.
STOP_GRACE_S = 2.0
# After SIGKILL a process is gone in microseconds unless stuck in the kernel (D state); after
# this long we stop waiting and leave it tracked by the watchdog.
REAP_TIMEOUT_S = 5.0
# Without pidfds (not Linux >= 5.3), a waiting run checks this often whether its worker died:
# a job's forked child may still hold the socket open, so EOF alone is not proof of life.
LIVENESS_SLICE_S = 0.5


def validate_target(target: str) -> None:
    """Check ``package.module:function`` syntax (dotted identifiers) without importing it."""
    module, sep, attr = target.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    if not sep or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise ConfigError(f"callable {target!r}: expected 'package.module:function' "
                          "(dotted Python identifiers, one ':')")


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    out_fd: int  # fds 1 and 2 of the worker: an unlinked O_APPEND file
    pidfd: int | None
    poller: select.poll
    inbox: Inbox

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def send(self, message: Mapping[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def receive(self, deadline: float) -> dict[str, Any]:
        """The next reply (skipping the ready frame). Raises _Timeout, _Died or FrameError."""
        while True:
            message = self.receive_frame(deadline)
            if "ready" not in message:
                return message

    def receive_frame(self, deadline: float) -> dict[str, Any]:
        while True:
            message = self.inbox.frame()
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout
            if self.pidfd is None:
                remaining = min(remaining, LIVENESS_SLICE_S)
            events = dict(self.poller.poll(math.ceil(remaining * 1000)))
            if events.get(self.sock.fileno()):
                if not self.inbox.fill():
                    raise _Died
            elif events or (self.pidfd is None and self.proc.poll() is not None):
                raise _Died  # the pidfd fired: the process is gone, and it sent nothing

    def take_output(self) -> tuple[bytes, int]:
        """What reached fds 1/2 since the last call (its tail, and its size); then truncate."""
        size = os.fstat(self.out_fd).st_size
        if size == 0:
            return b"", 0
        data = os.pread(self.out_fd, OUTPUT_LIMIT, max(0, size - OUTPUT_LIMIT))
        os.ftruncate(self.out_fd, 0)
        return data, size

    def close(self) -> None:
        self.sock.close()
        for fd in (self.out_fd, self.pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


class PythonPool:
    """``size`` warm worker processes; :meth:`run` is safe to call from ``size`` threads."""

    def __init__(self, size: int, *, watchdog: Watchdog | None, max_rss_mb: int | None = 1024,
                 env: Mapping[str, str] | None = None) -> None:
        if size < 1:
            raise ConfigError(f"python pool size must be at least 1, not {size}")
        self._size = size
        self._watchdog = watchdog
        self._max_rss_mb = max_rss_mb
        self._env = dict(env) if env is not None else {
            k: os.environ[k] for k in BASE_ENV if k in os.environ}
        self._cond = threading.Condition()
        self._idle: deque[_Worker] = deque()
        self._live: set[_Worker] = set()  # idle and busy; a worker leaves it before it is reaped
        self._count = 0  # live workers plus spawns in progress
        self._closed = False

    def start(self) -> None:
        """Start all workers and wait until each is ready. Raises CronsulError if one fails."""
        workers: list[_Worker] = []
        try:
            for _ in range(self._size):
                with self._cond:
                    self._count += 1
                workers.append(self._spawn_counted())
            deadline = time.monotonic() + START_TIMEOUT_S
            for w in workers:
                self._wait_ready(w, deadline)
        except CronsulError:
            for w in workers:
                self._discard(w)
            raise
        for w in workers:
            self._release(w)

    def _wait_ready(self, w: _Worker, deadline: float) -> None:
        try:
            message = w.receive_frame(deadline)
        except _Timeout:
            problem = f"was not ready after {START_TIMEOUT_S:g}s"
        except (_Died, FrameError, OSError) as exc:
            problem = f"failed to start ({exc or 'exited'})"
        else:
            if "ready" in message:
                return
            problem = "sent a reply before being asked"
        text = self._discard(w)[0].decode("utf-8", "replace").strip()
        raise CronsulError(f"python worker {w.pid} {problem}, exit status "
                           f"{w.proc.returncode}: {text[-2000:]}")

    def pids(self) -> list[int]:
        """The worker processes alive now (each also its own process group id)."""
        with self._cond:
            return sorted(w.pid for w in self._live)

    def execution(self) -> PyExecution:
        """A handle for one run whose :meth:`PyExecution.stop` works from another thread."""
        return PyExecution(self)

    def run(self, target: str, kwargs: Mapping[str, str], env: Mapping[str, str],
            timeout: float) -> Outcome:
        return PyExecution(self).run(target, kwargs, env, timeout)

    def stop(self) -> None:
        """Retire every worker: idle ones exit at EOF, busy ones are killed (their runs fail)."""
        with self._cond:
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
            for w in self._live:
                if w not in idle:
                    w.kill()
            self._cond.notify_all()
        for w in idle:
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_GRACE_S
        for w in idle:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            self._discard(w)

    # -- workers --------------------------------------------------------------------------

    def _spawn_counted(self) -> _Worker:
        """Start a worker for a slot already counted in ``_count`` (released on failure)."""
        try:
            return self._spawn()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        out_fd, path = tempfile.mkstemp(prefix="cronsul-pyworker-", suffix=".out")
        try:
            os.unlink(path)
            fcntl.fcntl(out_fd, fcntl.F_SETFL, fcntl.fcntl(out_fd, fcntl.F_GETFL) | os.O_APPEND)
            proc = subprocess.Popen(
                [sys.executable, "-c", BOOTSTRAP, PROCESS_TAG, str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=out_fd, stderr=out_fd, env=self._env,
                pass_fds=(theirs.fileno(),), start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            ours.close()
            os.close(out_fd)
            raise CronsulError(f"cannot start a python worker: {exc}") from exc
        finally:
            theirs.close()
        if self._watchdog is not None:
            self._watchdog.track(proc.pid)
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        poller = select.poll()
        poller.register(ours.fileno(), select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        w = _Worker(proc, ours, out_fd, pidfd, poller, Inbox(ours))
        with self._cond:
            self._live.add(w)
        with contextlib.suppress(OSError):  # if it died already, its first run will tell
            w.send({"path": [p for p in sys.path if p], "max_rss_mb": self._max_rss_mb,
                    "output_limit": OUTPUT_LIMIT})
        return w

    def _acquire(self) -> _Worker:
        """An idle, live worker (waiting for one if all are busy). Raises CronsulError."""
        while True:
            with self._cond:
                while not self._idle and self._count >= self._size and not self._closed:
                    self._cond.wait()
                if self._closed:
                    raise CronsulError("the python pool is stopped")
                w = self._idle.popleft() if self._idle else None
                if w is None:
                    self._count += 1  # one was lost and its replacement failed: start it now
            if w is None:
                return self._spawn_counted()
            if w.proc.poll() is None:
                return w
            self._replace(w)  # died while idle (the watchdog's deadline, the OOM killer)

    def _release(self, w: _Worker) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(w)
                self._cond.notify()
                return
        self._discard(w)

    def _discard(self, w: _Worker) -> tuple[bytes, int]:
        """Kill what is left of a worker's process group, reap it, forget it; its last output."""
        with self._cond:
            if w not in self._live:
                return b"", 0
            self._live.discard(w)
            self._count -= 1
            w.kill()  # while its pid cannot have been reused: it is not reaped yet
            self._cond.notify()
        try:
            w.proc.wait(REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel; the watchdog still tracks it
        else:
            if self._watchdog is not None:
                self._watchdog.untrack(w.pid)
        output = w.take_output()
        w.close()
        return output

    def _replace(self, w: _Worker) -> tuple[bytes, int]:
        """Discard a worker and start another in its place; the discarded one's last output."""
        output = self._discard(w)
        with self._cond:
            if self._closed or self._count >= self._size:
                return output
            self._count += 1
        with contextlib.suppress(CronsulError):  # if it fails, _acquire tries again
            self._release(self._spawn_counted())
        return output


class PyExecution:
    """One Python run on a :class:`PythonPool`; ``stop()`` may be called from another thread."""

    def __init__(self, pool: PythonPool) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._stopped = False

    def stop(self) -> None:
        """Kill the run now (its lease was lost): SIGKILL to its worker's process group."""
        with self._lock:
            self._stopped = True
            if self._worker is not None:
                self._worker.kill()

    def run(self, target: str, kwargs: Mapping[str, str], env: Mapping[str, str],
            timeout: float) -> Outcome:
        start = time.monotonic()
        pool = self._pool
        request = {"target": target, "kwargs": dict(kwargs), "env": dict(env)}
        for _ in range(2):  # a worker that died while idle has not started the job: retry once
            try:
                w = pool._acquire()
            except CronsulError as exc:
                return Outcome(None, None, False, time.monotonic() - start, "", 0, str(exc))
            try:
                w.send(request)
                break
            except OSError:
                pool._replace(w)
        else:
            return Outcome(None, None, False, time.monotonic() - start, "", 0,
                           f"callable {target!r}: python workers die before taking the run")
        with self._lock:
            if self._stopped:
                w.kill()
            self._worker = w
        try:
            reply = w.receive(time.monotonic() + timeout)  # waiting for a worker is not the job's
        except (_Timeout, _Died, FrameError, OSError) as exc:
            return self._failed(w, target, exc, timeout, start)
        with self._lock:
            self._worker = None
        data, size = w.take_output()
        if reply.get("recycle"):
            pool._replace(w)
        else:
            pool._release(w)
        return _outcome(reply, data, size, time.monotonic() - start)

    def _failed(self, w: _Worker, target: str, exc: Exception, timeout: float,
                start: float) -> Outcome:
        with self._lock:
            self._worker = None
            stopped = self._stopped
        timed_out = isinstance(exc, _Timeout)
        data, size = self._pool._replace(w)  # kills it first if a timeout left it running
        code = w.proc.returncode
        status = ("still running" if code is None
                  else f"signal {-code} ({_signal_name(-code)})" if code < 0
                  else f"exit code {code}")
        if timed_out:
            error = f"callable {target!r} timed out after {timeout:g}s; its worker was killed"
        elif stopped:
            error = f"callable {target!r} was stopped; its worker was killed"
        elif isinstance(exc, FrameError | OSError):
            error = f"python worker running {target!r} broke the protocol ({exc}): killed"
        else:
            error = f"python worker running {target!r} died: {status}"
        return Outcome(
            exit_code=code if code is not None and code >= 0 else None,
            signal=-code if code is not None and code < 0 else None,
            timed_out=timed_out,
            duration_s=time.monotonic() - start,
            output=data.decode("utf-8", "replace")[-OUTPUT_LIMIT:],
            output_bytes=size,
            error=error,
        )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def _outcome(reply: Mapping[str, Any], data: bytes, size: int, duration: float) -> Outcome:
    code, output, count, error = (reply.get(k) for k in ("code", "output", "bytes", "error"))
    text = output if isinstance(output, str) else ""
    if data:
        text += data.decode("utf-8", "replace")
    return Outcome(
        exit_code=code if isinstance(code, int) else None,
        signal=None,
        timed_out=False,
        duration_s=duration,
        output=text[-OUTPUT_LIMIT:],
        output_bytes=(count if isinstance(count, int) else 0) + size,
        error=error if isinstance(error, str) else None,
    )
