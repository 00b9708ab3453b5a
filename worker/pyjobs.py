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

import asyncio
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError, CronsulError
from worker.executor import BASE_ENV, OUTPUT_LIMIT, Outcome
from worker.pyworker import FrameError, Inbox, encode
from worker.reactor import Reactor
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
# A worker that dies younger than this before it was given any run (a broken interpreter, a
# package upgraded under it) is replaced after a pause that doubles from RESPAWN_FIRST_S up to
# RESPAWN_MAX_S, so a pool whose workers cannot live does not spin the reactor; runs wait for a
# worker meanwhile. A worker killed by its job (a crash, a timeout) is replaced at once.
EARLY_DEATH_S = 1.0
RESPAWN_FIRST_S = 0.1
RESPAWN_MAX_S = 10.0
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
    current: PyExecution | None = None  # the run it is busy with (reactor thread)
    watched: bool = False  # its pidfd is registered with the reactor
    spawned_at: float = 0.0  # monotonic
    runs: int = 0  # requests sent to it

    def alive(self) -> bool:
        """Whether the process still runs, without reaping it (its pid, the process group id,
        must stay ours until the group has been killed)."""
        if self.proc.returncode is not None:
            return False
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def send(self, message: Mapping[str, Any]) -> None:
        self.sock.sendall(encode(message))

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
                 env: Mapping[str, str] | None = None, reactor: Reactor | None = None) -> None:
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
        # Runs wait on the reactor thread for a worker here (only after a worker was lost and
        # its replacement could not start yet: the pool has one worker per run slot).
        self._waiting: deque[PyExecution] = deque()
        self._early_deaths = 0  # workers in a row that died young (reactor thread)
        self._respawn_timer: asyncio.TimerHandle | None = None
        self._own_reactor = reactor is None
        self.reactor = reactor or Reactor("python-pool")

    def start(self) -> None:
        """Start all workers and wait until each is ready. Raises CronsulError if one fails."""
        if self._own_reactor:
            self.reactor.start()
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
            w.sock.setblocking(False)  # from now on read by the reactor, only when readable
        def release_all() -> None:
            for w in workers:
                self._watch(w)
                self._release(w)

        self.reactor.call(release_all, START_TIMEOUT_S)

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
        try:
            self.reactor.call(self._stop_here, STOP_GRACE_S + REAP_TIMEOUT_S + 5)
        except (TimeoutError, RuntimeError):  # the reactor is gone: nothing else touches them
            self._stop_here()
        if self._own_reactor:
            self.reactor.stop()

    def _stop_here(self) -> None:
        with self._cond:
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
            busy = [w for w in self._live if w not in idle]
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        if self._respawn_timer is not None:
            self._respawn_timer.cancel()
            self._respawn_timer = None
        for run in waiting:
            run._report(Outcome(None, None, False, time.monotonic() - run._began, "", 0,
                                "the python pool is stopped"))
        for w in busy:
            w.kill()
            if w.current is not None:
                w.current._failed(_Died())
        for w in idle:
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_GRACE_S
        for w in idle:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            self._discard(w)
        for w in busy:
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
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:
            raise CronsulError(f"cannot start a python worker: {exc}") from exc
        try:
            out_fd, path = tempfile.mkstemp(prefix="cronsul-pyworker-", suffix=".out")
        except OSError as exc:
            ours.close()
            theirs.close()
            raise CronsulError(f"cannot start a python worker: {exc}") from exc
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
        w = _Worker(proc, ours, out_fd, pidfd, poller, Inbox(ours), spawned_at=time.monotonic())
        with self._cond:
            self._live.add(w)
        with contextlib.suppress(OSError):  # if it died already, its first run will tell
            w.send({"path": [p for p in sys.path if p], "max_rss_mb": self._max_rss_mb,
                    "output_limit": OUTPUT_LIMIT})
        return w

    def _acquire(self) -> _Worker | None:
        """An idle, live worker, or None when all are busy (reactor thread). CronsulError when
        the pool is stopped or a missing worker cannot be started."""
        while True:
            with self._cond:
                if self._closed:
                    raise CronsulError("the python pool is stopped")
                # The most recently used worker: warm caches, and the others stay asleep.
                w = self._idle.pop() if self._idle else None
                if w is None:
                    if self._count >= self._size or self._respawn_timer is not None:
                        return None  # all busy, or a replacement is due: wait for it
                    self._count += 1  # one was lost and its replacement failed: start it now
            if w is None:
                w = self._spawn_counted()
                w.sock.setblocking(False)
                self._watch(w)
                return w
            if w.alive():
                return w
            self._replace(w)  # died while idle (the watchdog's deadline, the OOM killer)

    def _release(self, w: _Worker) -> None:
        with self._cond:
            if self._closed:
                waiting = None
            elif self._waiting:
                waiting = self._waiting.popleft()
            else:
                self._idle.append(w)
                return
        if waiting is None:
            self._discard(w)
        else:
            waiting._dispatch(w)

    def _watch(self, w: _Worker) -> None:
        """Watch a worker's pidfd for its whole life (reactor thread): an idle worker that
        dies (the watchdog's deadline, the OOM killer) is replaced at once, a busy one fails
        its run."""
        if w.pidfd is not None and not w.watched:
            self.reactor.loop.add_reader(w.pidfd, self._on_exit, w)
            w.watched = True

    def _on_exit(self, w: _Worker) -> None:
        if w.current is not None:
            w.current._on_died()
            return
        with self._cond:
            idle = w in self._idle
            if idle:
                self._idle.remove(w)
        if idle:
            self._replace(w)
        elif w.watched and w.pidfd is not None:  # being discarded elsewhere: stop watching
            self.reactor.loop.remove_reader(w.pidfd)
            w.watched = False

    def _discard(self, w: _Worker) -> tuple[bytes, int]:
        """Kill what is left of a worker's process group, reap it, forget it; its last output."""
        with self._cond:
            if w not in self._live:
                return b"", 0
            self._live.discard(w)
            self._count -= 1
            w.kill()  # while its pid cannot have been reused: it is not reaped yet
            self._cond.notify()
        if w.watched and w.pidfd is not None:
            self.reactor.loop.remove_reader(w.pidfd)  # before its fd number can be reused
            w.watched = False
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
        self._refill(w)
        return output

    def _refill(self, w: _Worker) -> None:
        """After ``w`` was discarded: start its replacement now, or after a growing pause when
        workers keep dying young without having run anything (reactor thread)."""
        if w.runs == 0 and time.monotonic() - w.spawned_at < EARLY_DEATH_S:
            self._early_deaths += 1
        else:
            self._early_deaths = 0
        if self._early_deaths == 0:
            self._respawn()
        elif self._respawn_timer is None:
            self._respawn_later()

    def _respawn_later(self) -> None:
        delay = min(RESPAWN_MAX_S, RESPAWN_FIRST_S * 2 ** (self._early_deaths - 1))
        self._respawn_timer = self.reactor.loop.call_later(delay, self._respawn)

    def _respawn(self) -> None:
        """Start the missing workers, each handed to a waiting run or made idle (reactor
        thread); on failure try again after a pause, so waiting runs are never forgotten."""
        self._respawn_timer = None
        while True:
            with self._cond:
                if self._closed or self._count >= self._size:
                    return
                self._count += 1
            try:
                fresh = self._spawn_counted()
            except CronsulError:
                self._early_deaths += 1
                self._respawn_later()
                return
            fresh.sock.setblocking(False)
            self._watch(fresh)
            self._release(fresh)


class PyExecution:
    """One Python run on a :class:`PythonPool`, driven by the pool's reactor.

    :meth:`start` runs on the reactor thread and calls ``done(outcome)`` there; :meth:`stop`
    may be called from any thread; :meth:`run` is the blocking form."""

    def __init__(self, pool: PythonPool) -> None:
        self._pool = pool
        self._worker: _Worker | None = None
        self._stopped = False
        self._done: Callable[[Outcome], None] | None = None
        self._request: dict[str, Any] = {}
        self._target = ""
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._began = 0.0
        self._tries = 0

    def run(self, target: str, kwargs: Mapping[str, str], env: Mapping[str, str],
            timeout: float) -> Outcome:
        """Run the callable and wait for its outcome."""
        outcome: Outcome = self._pool.reactor.wait_for(self.start, target, kwargs, env, timeout)
        return outcome

    def stop(self) -> None:
        """Kill the run now (its lease was lost): SIGKILL to its worker's process group."""
        self._pool.reactor.call_soon(self._stop)

    def _stop(self) -> None:
        self._stopped = True
        if self._worker is not None:
            self._worker.kill()  # its pidfd fires: _on_died reports the run as stopped

    def start(self, target: str, kwargs: Mapping[str, str], env: Mapping[str, str],
              timeout: float, done: Callable[[Outcome], None]) -> None:
        """On the reactor thread: hand the run to an idle worker (or wait for one)."""
        self._done = done
        self._began = time.monotonic()
        self._target, self._timeout = target, timeout
        self._request = {"target": target, "kwargs": dict(kwargs), "env": dict(env)}
        try:
            w = self._pool._acquire()
        except CronsulError as exc:
            self._report(Outcome(None, None, False, time.monotonic() - self._began, "", 0,
                                 str(exc)))
            return
        if w is None:
            with self._pool._cond:
                self._pool._waiting.append(self)
            return
        self._dispatch(w)

    def _dispatch(self, w: _Worker) -> None:
        """Send the request to ``w``; a worker that died while idle has not started the job,
        so the run is tried once more on another."""
        if self._stopped:
            self._pool._release(w)
            self._report(Outcome(None, None, False, time.monotonic() - self._began, "", 0,
                                 f"callable {self._target!r} was stopped before it started"))
            return
        try:
            w.send(self._request)
        except OSError:
            self._pool._replace(w)
            self._tries += 1
            if self._tries >= 2:
                self._report(Outcome(None, None, False, time.monotonic() - self._began, "", 0,
                                     f"callable {self._target!r}: python workers die before "
                                     "taking the run"))
                return
            self.start(self._target, self._request["kwargs"], self._request["env"],
                       self._timeout, self._done or (lambda _o: None))
            return
        self._worker = w
        w.runs += 1
        loop = self._pool.reactor.loop
        w.current = self
        loop.add_reader(w.sock.fileno(), self._on_readable)
        if w.pidfd is None:  # no pidfds: check now and then that the worker is alive
            self._poll = loop.call_later(LIVENESS_SLICE_S, self._check_alive)
        # Waiting for a worker is not the job's time: the clock starts now.
        self._timer = loop.call_later(self._timeout, self._on_timeout)

    def _on_readable(self) -> None:
        w = self._worker
        if w is None:
            return
        try:
            if not w.inbox.fill():
                self._on_died()
                return
            while True:
                message = w.inbox.frame()
                if message is None:
                    return
                if "ready" not in message:
                    break
        except BlockingIOError:
            return
        except (FrameError, OSError) as exc:
            self._failed(exc)
            return
        self._detach()
        data, size = w.take_output()
        outcome = _outcome(message, data, size, time.monotonic() - self._began)
        try:
            self._report(outcome)
        finally:
            if message.get("recycle"):
                self._pool._replace(w)
            else:
                self._pool._release(w)

    def _check_alive(self) -> None:
        w = self._worker
        if w is None:
            return
        if not w.alive():
            self._on_died()
        else:
            self._poll = self._pool.reactor.loop.call_later(LIVENESS_SLICE_S, self._check_alive)

    def _on_died(self) -> None:
        w = self._worker
        if w is None:
            return
        # A reply it sent just before exiting (a recycle) is still in the socket: take it.
        try:
            filled = w.inbox.fill()
        except (BlockingIOError, OSError):
            filled = False
        if filled:
            try:
                message = w.inbox.frame()
            except FrameError:
                message = None
            if message is not None and "ready" not in message:
                self._detach()
                data, size = self._pool._discard(w)
                try:
                    self._report(_outcome(message, data, size, time.monotonic() - self._began))
                finally:
                    self._pool._refill(w)
                return
        self._failed(_Died())

    def _on_timeout(self) -> None:
        self._failed(_Timeout())

    def _detach(self) -> None:
        w = self._worker
        if w is None:
            return
        self._pool.reactor.loop.remove_reader(w.sock.fileno())
        w.current = None
        for handle in (self._timer, self._poll):
            if handle is not None:
                handle.cancel()
        self._worker = None

    def _failed(self, exc: Exception) -> None:
        w = self._worker
        if w is None:
            return
        self._detach()
        target, timeout = self._target, self._timeout
        timed_out = isinstance(exc, _Timeout)
        data, size = self._pool._discard(w)  # kills it first if a timeout left it running
        code = w.proc.returncode
        status = ("still running" if code is None
                  else f"signal {-code} ({_signal_name(-code)})" if code < 0
                  else f"exit code {code}")
        if timed_out:
            error = f"callable {target!r} timed out after {timeout:g}s; its worker was killed"
        elif self._stopped:
            error = f"callable {target!r} was stopped; its worker was killed"
        elif isinstance(exc, FrameError | OSError):
            error = f"python worker running {target!r} broke the protocol ({exc}): killed"
        else:
            error = f"python worker running {target!r} died: {status}"
        try:
            self._report(Outcome(
                exit_code=code if code is not None and code >= 0 else None,
                signal=-code if code is not None and code < 0 else None,
                timed_out=timed_out,
                duration_s=time.monotonic() - self._began,
                output=data.decode("utf-8", "replace")[-OUTPUT_LIMIT:],
                output_bytes=size,
                error=error,
            ))
        finally:
            self._pool._refill(w)

    def _report(self, outcome: Outcome) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(outcome)


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
