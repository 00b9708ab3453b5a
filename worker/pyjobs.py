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
* Memory: ``max_rss_mb`` ([worker] python_max_memory_mb) becomes RLIMIT_DATA in each worker
  (heap, anonymous memory and thread stacks: the closest to RSS a process can cap on itself;
  RLIMIT_AS would count address space only reserved, as each thread's malloc arena is), so a
  blow-up raises MemoryError in the job, which fails the run; that worker is then retired.
  Workers also set ``oom_score_adj`` to 1000 so the kernel's OOM killer picks them before the
  agent.
* Environment: a worker starts with ``env`` (default: the agent's BASE_ENV variables only, like
  shell jobs, so jobs do not see the agent's secrets); each run's ``env`` is laid over it in
  ``os.environ`` for the run (CRONSUL_* included), see :mod:`worker.pyworker`.
* Output: what the callable writes to ``sys.stdout``/``sys.stderr`` is streamed to the agent as
  it is written (``"out"`` frames): logged live as ``run_output`` with the run id bound (the
  first 200 lines, as for commands) and kept even if the worker is then killed; what reached
  fds 1/2 (child processes, C code) follows when the run ends or the worker dies. The return
  value's repr (if not None) is appended as ``return value: ...``; an exception's type, message
  and traceback tail become ``Outcome.error`` with exit code 1.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError, CronsulError
from worker.executor import BASE_ENV, OUTPUT_LIMIT, Outcome, OutputTail
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
# After SIGKILL a process is gone in microseconds unless stuck in the kernel (D state) or
# tearing down a large address space (a memory blow-up: tens of milliseconds per GiB). On the
# reactor thread, which serves every run of the node, a discarded worker is waited for at most
# REAP_WAIT_S; one still there is reaped when its pidfd fires (or by polling every
# LIVENESS_SLICE_S without pidfds). At pool stop, the wait is REAP_TIMEOUT_S; one still there
# after that is left tracked by the watchdog.
REAP_WAIT_S = 0.05
REAP_TIMEOUT_S = 5.0
# A worker that dies younger than this before it was given any run (a broken interpreter, a
# package upgraded under it) is replaced after a pause that doubles from RESPAWN_FIRST_S up to
# RESPAWN_MAX_S, so a pool whose workers cannot live does not spin the reactor; runs wait for a
# worker meanwhile. A worker killed by its job (a crash, a timeout) is replaced at once.
EARLY_DEATH_S = 1.0
RESPAWN_FIRST_S = 0.1
RESPAWN_MAX_S = 10.0
# With ``prefetch`` above 1, a run may be sent to a busy worker, to start there when the runs
# before it end, instead of waiting for an idle one: the worker then goes from run to run
# without sleeping, and one wake-up of the agent reads several replies. A run that waits inside
# a worker cannot move to another that frees up, so only short callables are queued that way:
# the callable's recent runs took less than PREFETCH_SHORT_S, and the worker's current run
# started less than PREFETCH_HEAD_AGE_S ago. PREFETCH_FRAME_MAX bounds a queued request: the
# requests a worker has not read yet sit in its socket buffer (about 200 KiB on Linux), which
# must never fill up, since the reactor's sends do not wait.
PREFETCH_SHORT_S = 0.05
PREFETCH_HEAD_AGE_S = 0.05
PREFETCH_FRAME_MAX = 16 * 1024
# A stopped run queued inside a worker is cancelled there (the worker skips it and says so);
# if it is the worker's current run by the time the agent looks, and no "cancelled" reply came
# within this long, it had started: the worker is killed.
CANCEL_GRACE_S = 0.05
# One read of a worker's replies takes at most this many receives (64 KiB each) before the
# reactor moves on; level-triggered readiness brings it back for the rest.
READ_CHUNKS_MAX = 64
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
    watched: bool = False  # its pidfd and socket are registered with the reactor
    spawned_at: float = 0.0  # monotonic
    runs: int = 0  # requests sent to it: also the next one's number (the worker counts alike)
    # The runs sent to it and not answered yet, in order (reactor thread): the first is
    # running, the others wait inside the worker (python_prefetch).
    queue: deque[PyExecution] = field(default_factory=deque)
    head_since: float = 0.0  # monotonic time queue[0] started
    timer: asyncio.TimerHandle | None = None  # fires at or before queue[0]'s deadline
    poll: asyncio.TimerHandle | None = None  # liveness check where there are no pidfds
    outbuf: bytearray = field(default_factory=bytearray)  # not yet accepted by the socket
    generation: int = 0  # the pool's generation it was started in (see PythonPool.renew)

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

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

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

    def close(self, *, keep_pidfd: bool = False) -> None:
        """Close its socket and output file, and its pidfd unless it is still to be reaped."""
        self.sock.close()
        for fd in (self.out_fd, None if keep_pidfd else self.pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


class PythonPool:
    """``size`` warm worker processes; :meth:`run` is safe to call from ``size`` threads."""

    def __init__(self, size: int, *, watchdog: Watchdog | None, max_rss_mb: int | None = 1024,
                 env: Mapping[str, str] | None = None, reactor: Reactor | None = None,
                 prefetch: int = 1, reap_wait_s: float = REAP_WAIT_S) -> None:
        if size < 1:
            raise ConfigError(f"python pool size must be at least 1, not {size}")
        if prefetch < 1:
            raise ConfigError(f"python prefetch must be at least 1, not {prefetch}")
        self._size = size
        self._prefetch = prefetch
        self._reap_wait_s = reap_wait_s
        # Recent run time per callable (reactor thread): only short ones are queued behind
        # another run. One long run counts at once; short ones bring it down slowly.
        self._recent: dict[str, float] = {}
        self._watchdog = watchdog
        self._max_rss_mb = max_rss_mb
        self._env = dict(env) if env is not None else {
            k: os.environ[k] for k in BASE_ENV if k in os.environ}
        self._cond = threading.Condition()
        self._idle: deque[_Worker] = deque()
        self._live: set[_Worker] = set()  # idle and busy; a worker leaves it before it is reaped
        self._count = 0  # live workers plus spawns in progress
        self._closed = False
        # Runs wait here (reactor thread) while every worker is busy (python_workers below
        # concurrency, or a lost worker not replaced yet), first come first served.
        self._waiting: deque[PyExecution] = deque()
        self._early_deaths = 0  # workers in a row that died young (reactor thread)
        self._reaping: set[_Worker] = set()  # killed, still dying, reaped when gone (reactor)
        self._respawn_timer: asyncio.TimerHandle | None = None
        self._generation = 0  # raised by renew(): older workers are replaced once idle
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
                self._discard(w, blocking=True)
            raise
        for w in workers:
            w.sock.setblocking(False)  # from now on read by the reactor, only when readable
        def release_all() -> None:
            for w in workers:
                self._watch(w)
                self._release(w)

        try:
            self.reactor.call(release_all, START_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as exc:  # the reactor stopped meanwhile (shutdown)
            with self._cond:
                self._closed = True
            for w in workers:
                self._discard(w, blocking=True)
            raise CronsulError(f"cannot start the python pool: its reactor stopped ({exc})"
                               ) from exc

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
        text = self._discard(w, blocking=True)[0].decode("utf-8", "replace").strip()
        raise CronsulError(f"python worker {w.pid} {problem}, exit status "
                           f"{w.proc.returncode}: {text[-2000:]}")

    def pids(self) -> list[int]:
        """The worker processes alive now (each also its own process group id)."""
        with self._cond:
            return sorted(w.pid for w in self._live)

    def execution(self, log: Any = None) -> PyExecution:
        """A handle for one run whose :meth:`PyExecution.stop` works from another thread;
        ``log`` (bound with the run id) gets its output lines as they come."""
        return PyExecution(self, log)

    def run(self, target: str, kwargs: Mapping[str, str], env: Mapping[str, str],
            timeout: float) -> Outcome:
        return PyExecution(self).run(target, kwargs, env, timeout)

    def renew(self) -> None:
        """Replace every worker so that the next runs import the jobs' code afresh (a reload
        after a deploy): idle ones now, busy ones when their runs end (never killed for it).
        Any thread."""
        self.reactor.call_soon(self._renew_here)

    def _renew_here(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._generation += 1
            idle = list(self._idle)
            self._idle.clear()
        for w in idle:
            self._retire(w)

    def _retire(self, w: _Worker) -> None:
        """Replace ``w``, idle and of an older generation (reactor thread). Not through
        _refill: retiring a young worker is no sign that workers die young."""
        self._discard(w)
        self._respawn()

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
        for w in busy:  # their runs fail; the runs queued behind them never started
            if w in self._live:
                self._read_replies(w)  # runs that ended meanwhile are reported as they ended
            if w in self._live:
                w.kill()
                self._lost(w, _Died())
        with self._cond:
            waiting += self._waiting
            self._waiting.clear()
        for run in waiting:
            run._unstarted("the python pool is stopped")
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
        self._finish_reaping()

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
        w = _Worker(proc, ours, out_fd, pidfd, poller, Inbox(ours), spawned_at=time.monotonic(),
                    generation=self._generation)
        with self._cond:
            self._live.add(w)
        with contextlib.suppress(OSError):  # if it died already, its first run will tell
            w.send(encode({"path": [p for p in sys.path if p], "max_rss_mb": self._max_rss_mb,
                           "output_limit": OUTPUT_LIMIT, "stream": True}))
        return w

    def _acquire(self, run: PyExecution) -> _Worker | None:
        """A worker for ``run`` (reactor thread): an idle, live one; else, if ``run`` may be
        queued behind another, the busy worker with the fewest queued; else None (it waits).
        CronsulError when the pool is stopped or a missing worker cannot be started."""
        while True:
            with self._cond:
                if self._closed:
                    raise CronsulError("the python pool is stopped")
                # The most recently used worker: warm caches, and the others stay asleep.
                w = self._idle.pop() if self._idle else None
                if w is None:
                    if self._count >= self._size or self._respawn_timer is not None:
                        # All busy, or a replacement is due. Runs already waiting go first.
                        return None if self._waiting else self._queue_behind(run)
                    self._count += 1  # one was lost and its replacement failed: start it now
            if w is None:
                w = self._spawn_counted()
                w.sock.setblocking(False)
                self._watch(w)
                return w
            if w.alive():
                return w
            self._replace(w)  # died while idle (the watchdog's deadline, the OOM killer)

    def _queue_behind(self, run: PyExecution) -> _Worker | None:
        """The busy worker ``run`` may wait inside (fewest queued), or None."""
        best: _Worker | None = None
        for w in self._live:
            if w.queue and self._may_queue(w, run) and (best is None
                                                        or len(w.queue) < len(best.queue)):
                best = w
        return best

    def _may_queue(self, w: _Worker, run: PyExecution) -> bool:
        """Whether ``run`` may be sent to busy ``w`` to start when its runs end: only a short
        callable, behind a few runs that are short too, with a small request."""
        short = self._recent
        return (len(w.queue) < self._prefetch
                and w.generation == self._generation  # an old one must run dry (renew)
                and len(run._frame) <= PREFETCH_FRAME_MAX
                and short.get(run._target, math.inf) < PREFETCH_SHORT_S
                and time.monotonic() - w.head_since < PREFETCH_HEAD_AGE_S
                and all(short.get(r._target, math.inf) < PREFETCH_SHORT_S and not r._stopped
                        for r in w.queue))

    def _submit(self, run: PyExecution) -> None:
        if run._stopped:
            run._stopped_before_start()
            return
        try:
            w = self._acquire(run)
        except CronsulError as exc:
            run._unstarted(str(exc))
            return
        if w is None:
            with self._cond:
                self._waiting.append(run)
            return
        self._dispatch(w, run)

    def _dispatch(self, w: _Worker, run: PyExecution) -> None:
        """Send ``run`` to ``w`` (reactor thread). A worker that died before taking it has not
        started the job, so the run is tried once more on another."""
        if run._stopped:  # only from _top_up, which keeps the worker
            run._stopped_before_start()
            return
        if not self._write(w, run._frame):
            self._lost(w, _Died())
            run._tries += 1
            if run._tries >= 2:
                run._unstarted(f"callable {run._target!r}: python workers die before taking "
                               "the run")
                return
            self._submit(run)
            return
        run._worker = w
        run._seq = w.runs
        run._sent_at = time.monotonic()
        w.runs += 1
        w.queue.append(run)
        if len(w.queue) == 1:
            w.head_since = run._sent_at  # waiting for a worker is not the job's time
            self._arm(w)

    def _write(self, w: _Worker, frame: bytes) -> bool:
        """Send ``frame`` to ``w`` without blocking the reactor: what the socket does not take
        now waits in ``w.outbuf`` for it to become writable. False when the worker is gone."""
        if w.outbuf:
            w.outbuf += frame
            return True
        try:
            n = w.sock.send(frame)
        except BlockingIOError:
            n = 0
        except OSError:
            return False
        if n < len(frame):
            w.outbuf += frame[n:]
            self.reactor.loop.add_writer(w.sock.fileno(), self._on_writable, w)
        return True

    def _on_writable(self, w: _Worker) -> None:
        try:
            n = w.sock.send(w.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self.reactor.loop.remove_writer(w.sock.fileno())
            w.outbuf.clear()
            return  # the worker is gone: its pidfd (or EOF) reports it
        del w.outbuf[:n]
        if not w.outbuf:
            self.reactor.loop.remove_writer(w.sock.fileno())

    def _cancel(self, w: _Worker, run: PyExecution) -> None:
        """Ask ``w`` to skip ``run``, queued behind its current run (its lease was lost)."""
        if not run._cancel_sent:
            run._cancel_sent = True
            self._write(w, encode({"cancel": run._seq}))

    def _release(self, w: _Worker) -> None:
        """``w`` has nothing queued (reactor thread): give it waiting runs, or make it idle."""
        if w.generation != self._generation and w in self._live:
            self._retire(w)  # its replacement takes the waiting runs
            return
        self._top_up(w)
        if w.queue or w not in self._live:
            return
        with self._cond:
            if not self._closed:
                self._idle.append(w)
                return
        self._discard(w)

    def _top_up(self, w: _Worker) -> None:
        """Send ``w`` the waiting runs it may take now, in order."""
        while w in self._live:
            with self._cond:
                if self._closed or not self._waiting:
                    return
                run = self._waiting[0]
                if w.queue and not self._may_queue(w, run):
                    return
                self._waiting.popleft()
            self._dispatch(w, run)

    def _kick(self) -> None:
        """Hand waiting runs to idle workers (after runs were put back in the line)."""
        while True:
            with self._cond:
                if self._closed or not self._waiting or not self._idle:
                    return
                w = self._idle.pop()
            if w.alive():
                self._release(w)
            else:
                self._replace(w)

    def _arm(self, w: _Worker) -> None:
        """Make ``w``'s timer fire no later than its running run's deadline. A timer that
        fires early (the run it was set for ended) finds the new deadline and waits again."""
        loop = self.reactor.loop
        deadline = w.head_since + w.queue[0]._timeout
        if w.timer is not None:
            if w.timer.when() <= deadline:
                return
            w.timer.cancel()
        w.timer = loop.call_at(deadline, self._on_timer, w)
        if w.pidfd is None and w.poll is None:  # no pidfds: check now and then that it lives
            w.poll = loop.call_later(LIVENESS_SLICE_S, self._check_alive, w)

    def _disarm(self, w: _Worker) -> None:
        for handle in (w.timer, w.poll):
            if handle is not None:
                handle.cancel()
        w.timer = w.poll = None

    def _watch(self, w: _Worker) -> None:
        """Watch a worker's pidfd and socket for its whole life (reactor thread): an idle
        worker that dies (the watchdog's deadline, the OOM killer) is replaced at once, a busy
        one fails its run; replies are read the moment they arrive."""
        if not w.watched:
            if w.pidfd is not None:
                self.reactor.loop.add_reader(w.pidfd, self._on_exit, w)
            self.reactor.loop.add_reader(w.sock.fileno(), self._on_readable, w)
            w.watched = True

    def _unwatch(self, w: _Worker) -> None:
        """Stop watching ``w`` (before its fd numbers can be reused)."""
        if w.watched:
            if w.pidfd is not None:
                self.reactor.loop.remove_reader(w.pidfd)
            self.reactor.loop.remove_reader(w.sock.fileno())
            self.reactor.loop.remove_writer(w.sock.fileno())
            w.watched = False

    # -- replies and deaths (reactor thread) ---------------------------------------------

    def _on_readable(self, w: _Worker) -> None:
        answered = self._read_replies(w)
        if answered <= 0 or w not in self._live:
            return
        if not w.queue:
            self._release(w)
            return
        head = w.queue[0]
        if head._stopped:
            if not head._cancel_sent:  # it may have started already: kill it
                w.kill()  # its pidfd reports it
            elif head._grace is None:  # its "cancelled" reply is due now, or it started
                head._grace = self.reactor.loop.call_later(CANCEL_GRACE_S, self._cancel_overdue,
                                                           w, head)
            return
        self._arm(w)
        self._top_up(w)

    def _cancel_overdue(self, w: _Worker, run: PyExecution) -> None:
        run._grace = None
        if w in self._live and w.queue and w.queue[0] is run and not run._reported:
            self._on_readable(w)  # its "cancelled" reply may be waiting unread
            if w in self._live and w.queue and w.queue[0] is run:
                w.kill()  # it started before the cancel reached the worker

    def _read_replies(self, w: _Worker) -> int:
        """Read what ``w`` sent and report the runs it answered: their number, or -1 when the
        worker was lost meanwhile (EOF, a broken frame, a recycle)."""
        eof = False
        try:
            for _ in range(READ_CHUNKS_MAX):  # all that is there: a reply may span receives
                if not w.inbox.fill():
                    eof = True  # it exited or closed its end
                    break
        except BlockingIOError:
            pass
        except ConnectionResetError:  # it died with requests unread: a death, not a breach
            eof = True
        except OSError as exc:
            self._lost(w, exc)
            return -1
        answered = 0
        while True:
            try:
                message = w.inbox.frame()
            except FrameError as exc:
                self._lost(w, exc)
                return -1
            if message is None:
                if eof:
                    self._lost(w, _Died())
                    return -1
                return answered
            if "ready" in message:  # a replacement saying hello
                continue
            if "out" in message:  # output of its running run, always before that run's reply
                if w.queue:
                    w.queue[0]._output(message["out"])
                continue
            if not w.queue:
                self._lost(w, FrameError("a reply to no request"))
                return -1
            run = w.queue.popleft()
            answered += 1
            self._answered(w, run, message)
            if message.get("recycle"):  # it exits now: what it had queued never started
                self._lost(w, None)
                return -1

    def _answered(self, w: _Worker, run: PyExecution, reply: Mapping[str, Any]) -> None:
        now = time.monotonic()
        took, ended = reply.get("took"), reply.get("ended")
        if w.queue:  # the next run started when this one ended (or when it was sent, if
            # later), not when we read the reply
            start = float(ended) if isinstance(ended, int | float) else now
            w.head_since = min(now, max(w.head_since, w.queue[0]._sent_at, start))
        run._worker = None
        if run._grace is not None:
            run._grace.cancel()
            run._grace = None
        if reply.get("cancelled"):
            run._stopped_before_start()
            return
        duration = (float(took) if isinstance(took, int | float) and 0 <= took <= now - run._began
                    else now - run._sent_at)
        self._note_duration(run._target, duration)
        run._answered(reply, duration)

    def _note_duration(self, target: str, duration: float) -> None:
        """Remember how long ``target`` takes: a long run counts at once, short ones bring the
        estimate down slowly."""
        old = self._recent.get(target)
        self._recent[target] = (duration if old is None or duration > old
                                else old * 0.9 + duration * 0.1)

    def _on_exit(self, w: _Worker) -> None:
        """``w``'s pidfd fired: the process is gone."""
        if w not in self._live:  # being discarded elsewhere: stop watching
            self._unwatch(w)
            return
        # Replies it sent just before exiting (a recycle, its last run's) are still in the
        # socket: take them first. Not until EOF: a child the job forked (multiprocessing)
        # may hold the socket open for as long as it lives, and the reactor would spin here
        # meanwhile, stalling every run of the node; the process is gone, so what it sent is
        # all there already.
        while w in self._live and self._read_replies(w) > 0:
            pass
        if w in self._live:
            self._lost(w, _Died())

    def _on_timer(self, w: _Worker) -> None:
        w.timer = None
        if not w.queue or w not in self._live:
            return
        self._on_readable(w)  # its run may have ended just now: that reply is not late
        if not w.queue or w not in self._live or w.timer is not None or w.queue[0]._stopped:
            return
        if time.monotonic() < w.head_since + w.queue[0]._timeout:
            self._arm(w)
        else:
            self._lost(w, _Timeout())

    def _check_alive(self, w: _Worker) -> None:
        w.poll = None
        if not w.queue or w not in self._live:
            return
        if w.alive():
            w.poll = self.reactor.loop.call_later(LIVENESS_SLICE_S, self._check_alive, w)
        else:
            self._on_exit(w)

    def _lost(self, w: _Worker, exc: Exception | None) -> None:
        """``w`` is dead or must die: the run it is running fails with ``exc`` (None: it is
        running none), the runs queued behind never started and go back to the head of the
        line; a replacement is started."""
        runs = list(w.queue)
        w.queue.clear()
        self._disarm(w)
        started = w.head_since
        data, size = self._discard(w)  # kills it first if it still runs
        for run in runs:
            run._worker = None
            run._cancel_sent = False
            if run._grace is not None:
                run._grace.cancel()
                run._grace = None
        if runs and exc is not None:
            head = runs.pop(0)
            took = time.monotonic() - started
            self._note_duration(head._target, math.inf if isinstance(exc, _Timeout) else took)
            # Not reaped yet (still dying): it dies of the SIGKILL _discard sent it.
            code = w.proc.returncode if w.proc.returncode is not None else -signal.SIGKILL
            head._failed(exc, code, data, size, took)
        if runs:
            with self._cond:
                self._waiting.extendleft(reversed(runs))
        self._refill(w)
        self._kick()

    def _discard(self, w: _Worker, *, blocking: bool = False) -> tuple[bytes, int]:
        """Kill what is left of a worker's process group, forget it, reap it; its last output.
        On the reactor thread a worker still dying after ``reap_wait_s`` (REAP_WAIT_S) is
        reaped later, once it is gone; at start (``blocking``) and at stop the wait is up to
        REAP_TIMEOUT_S."""
        with self._cond:
            if w not in self._live:
                return b"", 0
            wait_s = REAP_TIMEOUT_S if blocking or self._closed else self._reap_wait_s
            self._live.discard(w)
            if w in self._idle:
                self._idle.remove(w)
            self._count -= 1
            w.kill()  # while its pid cannot have been reused: it is not reaped yet
            self._cond.notify()
        self._unwatch(w)  # before its fd numbers can be reused
        self._disarm(w)
        output = w.take_output()  # complete: a killed process writes nothing more
        try:
            w.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            if wait_s >= REAP_TIMEOUT_S:
                w.close()  # stuck in the kernel (stop); the watchdog still tracks it
                return output
            w.close(keep_pidfd=True)
            self._reap_later(w)
            return output
        if self._watchdog is not None:
            self._watchdog.untrack(w.pid)
        w.close()
        return output

    def _reap_later(self, w: _Worker) -> None:
        """Reap a killed worker that is still dying, without waiting for it (reactor thread):
        when its pidfd fires, or by polling."""
        loop = self.reactor.loop

        def reap() -> None:
            if w not in self._reaping:  # finished by _finish_reaping (pool stop)
                return
            if w.proc.poll() is None:
                if w.pidfd is None:
                    loop.call_later(LIVENESS_SLICE_S, reap)
                return  # the pidfd fired early? it fires again
            self._reaped(w)

        self._reaping.add(w)
        if w.pidfd is not None:
            loop.add_reader(w.pidfd, reap)
        else:
            loop.call_later(LIVENESS_SLICE_S, reap)

    def _reaped(self, w: _Worker) -> None:
        """A killed worker is gone and reaped: stop watching it, forget it."""
        self._reaping.discard(w)
        if w.pidfd is not None:
            with contextlib.suppress(ValueError, RuntimeError):  # the loop may be closed
                self.reactor.loop.remove_reader(w.pidfd)
            with contextlib.suppress(OSError):
                os.close(w.pidfd)
            w.pidfd = None
        if self._watchdog is not None:
            self._watchdog.untrack(w.pid)

    def _finish_reaping(self) -> None:
        """At pool stop: wait (up to REAP_TIMEOUT_S) for killed workers still dying."""
        deadline = time.monotonic() + REAP_TIMEOUT_S
        for w in list(self._reaping):
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            if w.proc.returncode is not None:
                self._reaped(w)

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

    def __init__(self, pool: PythonPool, log: Any = None) -> None:
        self._pool = pool
        self._log = log
        self._tail = OutputTail(OUTPUT_LIMIT, log)
        self._worker: _Worker | None = None  # the worker it was sent to, until answered
        self._stopped = False
        self._done: Callable[[Outcome], None] | None = None
        self._frame = b""  # the encoded request
        self._target = ""
        self._timeout = 0.0
        self._began = 0.0
        self._tries = 0
        self._seq = 0  # its number among the requests its worker got
        self._sent_at = 0.0  # monotonic time it was sent to its worker
        self._cancel_sent = False
        self._grace: asyncio.TimerHandle | None = None  # see CANCEL_GRACE_S
        self._reported = False

    def run(self, target: str, kwargs: Mapping[str, str], env: Mapping[str, str],
            timeout: float) -> Outcome:
        """Run the callable and wait for its outcome."""
        outcome: Outcome = self._pool.reactor.wait_for(self.start, target, kwargs, env, timeout)
        return outcome

    def live_output(self, offset: int, cap: int) -> tuple[int, bytes]:
        """Reactor thread: what it printed after byte ``offset`` (the ``"out"`` frames so far;
        see :meth:`OutputTail.since`)."""
        return self._tail.since(offset, cap)

    def stop(self) -> None:
        """Kill the run now (its lease was lost): SIGKILL to its worker's process group."""
        self._pool.reactor.call_soon(self._stop)

    def _stop(self) -> None:
        self._stopped = True
        w = self._worker
        if w is None or self._reported:
            return  # still waiting for a worker: it is never sent
        if w.queue and w.queue[0] is self:
            w.kill()  # its pidfd fires: the run is reported as stopped
        else:  # queued behind another run: the worker skips it (or is killed if it started)
            self._pool._cancel(w, self)

    def _stopped_before_start(self) -> None:
        self._unstarted(f"callable {self._target!r} was stopped before it started")

    def _unstarted(self, error: str) -> None:
        """Report the run failed with ``error`` without its callable having been called."""
        self._report(Outcome(None, None, False, time.monotonic() - self._began,
                             self._tail.text(), self._tail.total, error))

    def start(self, target: str, kwargs: Mapping[str, str], env: Mapping[str, str],
              timeout: float, done: Callable[[Outcome], None],
              output_limit: int | None = None) -> None:
        """On the reactor thread: hand the run to a worker (or wait for one). ``output_limit``:
        the job's tail size (default: the pool's, OUTPUT_LIMIT)."""
        self._done = done
        self._began = time.monotonic()
        self._target, self._timeout = target, timeout
        request: dict[str, Any] = {"target": target, "kwargs": dict(kwargs), "env": dict(env)}
        if output_limit is not None:
            request["output_limit"] = output_limit
            self._tail = OutputTail(min(output_limit, OUTPUT_LIMIT), self._log)
        self._frame = encode(request)
        self._pool._submit(self)

    def _failed(self, exc: Exception, code: int | None, data: bytes, size: int,
                duration: float) -> None:
        """Its worker died or was killed while running it (exit status ``code``)."""
        target, timeout = self._target, self._timeout
        timed_out = isinstance(exc, _Timeout)
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
        output, output_bytes = self._output_end(data, size)
        self._report(Outcome(
            exit_code=code if code is not None and code >= 0 else None,
            signal=-code if code is not None and code < 0 else None,
            timed_out=timed_out,
            duration_s=duration,
            output=output,
            output_bytes=output_bytes,
            error=error,
        ))

    def _output(self, text: object) -> None:
        """Output its worker streamed while it runs."""
        if isinstance(text, str) and not self._reported:
            self._tail.feed(_utf8(text))

    def _output_end(self, fd_data: bytes, fd_size: int) -> tuple[str, int]:
        """Its whole output: what was streamed, then the tail of what reached fds 1/2
        (``fd_data``, the last bytes of ``fd_size``); the last lines are logged."""
        if fd_data:
            self._tail.feed(fd_data)
        self._tail.total += max(0, fd_size - len(fd_data))
        self._tail.end()
        return self._tail.text(), self._tail.total

    def _answered(self, reply: Mapping[str, Any], duration: float) -> None:
        """Its worker's reply (output: what reached fds 1/2, the rest was streamed)."""
        code, output, count, error = (reply.get(k) for k in ("code", "output", "bytes", "error"))
        data = _utf8(output) if isinstance(output, str) else b""
        text, total = self._output_end(data, count if isinstance(count, int) else len(data))
        self._report(Outcome(
            exit_code=code if isinstance(code, int) else None,
            signal=None,
            timed_out=False,
            duration_s=duration,
            output=text,
            output_bytes=total,
            error=error if isinstance(error, str) else None,
        ))

    def _report(self, outcome: Outcome) -> None:
        self._reported = True
        self._worker = None
        done, self._done = self._done, None
        if done is None:
            return
        try:
            done(outcome)
        except Exception as exc:  # the pool's bookkeeping must go on
            self._pool.reactor.loop.call_exception_handler(
                {"message": f"python run callback failed: {exc!r}", "exception": exc})


def _utf8(text: str) -> bytes:
    """``text`` in UTF-8, a lone surrogate (a file name decoded with surrogateescape) as
    U+FFFD."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
