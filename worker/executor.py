"""Running one job command: argv without a shell, its own process group, timeout TERM->KILL."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.reactor import Reactor
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
# Without pidfds (Linux < 5.3) a process's exit is polled this often.
EXIT_POLL_S = 0.05
# During a kill grace whose leader has exited: how often the rest of the group is looked for
# (a /proc scan), so the run ends soon after the last process of the group does.
GROUP_POLL_S = 0.1
# Signals Python ignores in the agent (SIGPIPE, SIGXFSZ) are reset to their default in a job, as
# subprocess does (restore_signals), or `yes | head` in a job would not end.
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
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
                    cronsul: Mapping[str, str],
                    account: Mapping[str, str] | None = None) -> dict[str, str]:
    """The base variables from the agent, then the job user's account (``account_of``), then
    the job's ``env``, then ``CRONSUL_*``. A job run as another ``user`` gets cron's default
    PATH, not the agent's (a root agent's may name root's own directories: a review saw
    /root/.cargo/bin); its ``env`` may set one."""
    env = {k: agent_env[k] for k in BASE_ENV if k in agent_env}
    env.setdefault("PATH", DEFAULT_PATH)
    if account:
        env["PATH"] = DEFAULT_PATH
    env.update(account or {})
    env.update(job_env)
    env.update(cronsul)
    return env


def account_of(user: str | None) -> dict[str, str]:
    """HOME, USER and LOGNAME of the job's ``user`` from its passwd entry, and SHELL=/bin/sh,
    as cron sets them (the agent's would send the job to the agent's home; the user's login
    shell may be nologin). KeyError: no such user."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name,
            "SHELL": "/bin/sh"}


class Execution:
    """One job process group, driven by a :class:`Reactor` (no thread of its own).

    :meth:`start` runs on the reactor thread and calls ``done(outcome)`` there when the process
    has exited and its output pipe is closed; :meth:`stop` may be called from any thread;
    :meth:`run` is the blocking form (``cronsul run --local``, tests). The process is started
    with ``posix_spawn`` (vfork: the cheapest way to start a process) unless the job needs a
    working directory or another user, which only ``subprocess.Popen`` can set up; either way
    it gets its own session (so its group can be killed), stdin from /dev/null, and stdout and
    stderr on one pipe. Its exit is watched through a pidfd, its output through the pipe."""

    def __init__(self, watchdog: Watchdog | None, kill_grace: float,
                 output_limit: int = OUTPUT_LIMIT, log: Any = None,
                 reactor: Reactor | None = None) -> None:
        self._watchdog = watchdog
        self._kill_grace = kill_grace
        self._log = log
        self._reactor = reactor
        self._tail = OutputTail(output_limit, log)
        self._done: Callable[[Outcome], None] | None = None
        self._pid: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._out_fd: int | None = None
        self._pidfd: int | None = None
        self._code: int | None = None
        self._exited = False
        self._timed_out = False
        self._stopping = False
        self._kill_at: float | None = None  # loop time of the KILL after a TERM (grace end)
        self._timers: list[asyncio.TimerHandle] = []
        self._began = 0.0

    # -- blocking form ----------------------------------------------------------------------

    def run(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
            timeout: float, user: str | None = None) -> Outcome:
        """Start the command and wait for its outcome (on a reactor of its own if none given)."""
        own = self._reactor is None
        reactor = self._reactor or Reactor("execution").start()
        self._reactor = reactor
        try:
            outcome: Outcome = reactor.wait_for(self.start, argv, env, cwd, timeout, user)
        finally:
            if own:
                reactor.stop()
        return outcome

    # -- on the reactor thread --------------------------------------------------------------

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
              timeout: float, user: str | None, done: Callable[[Outcome], None],
              identity: Mapping[str, Any] | None = None) -> None:
        """Start the process (reactor thread); ``done(outcome)`` follows on the same thread.
        ``identity``: ``user`` already resolved by :func:`identity_of` (off the reactor: a
        user lookup may wait on a directory service, and the reactor serves every run)."""
        assert self._reactor is not None, "start() needs a reactor"
        loop = self._reactor.loop
        self._done = done
        self._began = time.monotonic()
        if identity is None:
            try:
                identity = identity_of(user)
            except (KeyError, PermissionError) as exc:
                self._report(Outcome(None, None, False, 0.0, "", 0, identity_error(exc)))
                return
        if self._stopping:  # stop() came before the process existed: never start it
            self._report(Outcome(None, None, False, 0.0, "", 0, "stopped before it started"))
            return
        read_fd, write_fd = os.pipe()
        try:
            self._pid = self._spawn(argv, env, cwd, identity, write_fd)
        except (OSError, ValueError, TypeError) as exc:  # ValueError: a NUL in an argument
            os.close(read_fd)
            self._report(Outcome(None, None, False, 0.0, "", 0,
                                 f"cannot start {argv[0]!r}: {exc}"))
            return
        finally:
            os.close(write_fd)
        if self._watchdog is not None:
            self._watchdog.track(self._pid)
        os.set_blocking(read_fd, False)
        self._out_fd = read_fd
        loop.add_reader(read_fd, self._on_output)
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except (AttributeError, OSError):  # no pidfds (Linux < 5.3): poll for the exit
            self._timers.append(loop.call_later(EXIT_POLL_S, self._poll_exit))
        else:
            loop.add_reader(self._pidfd, self._on_exit)
        self._timers.append(loop.call_later(timeout, self._on_timeout))

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
               identity: Mapping[str, Any], out_fd: int) -> int:
        if cwd is None and not identity:
            path = _executable(argv[0], env)
            return os.posix_spawn(
                path, list(argv), dict(env),
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, out_fd, 1), (os.POSIX_SPAWN_DUP2, out_fd, 2)],
                setsid=True, setsigdef=RESTORED_SIGNALS,
            )
        self._popen = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out_fd,
            stderr=out_fd, start_new_session=True, close_fds=True, **identity,
        )
        return self._popen.pid

    def _on_output(self) -> None:
        assert self._out_fd is not None
        try:
            chunk = os.read(self._out_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self._tail.feed(chunk)
            return
        self._close_output()
        self._maybe_done()

    def _close_output(self) -> None:
        if self._out_fd is not None and self._reactor is not None:
            self._reactor.loop.remove_reader(self._out_fd)
            os.close(self._out_fd)
            self._out_fd = None

    def _poll_exit(self) -> None:
        assert self._pid is not None and self._reactor is not None
        if os.waitid(os.P_PID, self._pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            self._timers = [t for t in self._timers if not t.cancelled() and t.when() >
                            self._reactor.loop.time()]
            self._timers.append(self._reactor.loop.call_later(EXIT_POLL_S, self._poll_exit))
            return
        self._on_exit()

    def _on_exit(self) -> None:
        assert self._pid is not None and self._reactor is not None
        loop = self._reactor.loop
        if self._pidfd is not None:
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._kill_at is not None and loop.time() < self._kill_at:
            # TERM was sent and the leader is gone, but the rest of its group keeps the grace
            # period: `sh -c` or a wrapper script dies at once on TERM while the program it
            # started is still cleaning up (its output may go to a file, not to our pipe). The
            # leader stays unreaped (it holds the group id); the group is KILLed and the leader
            # reaped when the grace ends, or as soon as nothing else in the group is alive.
            self._timers.append(loop.call_at(self._kill_at, self._reap))
            self._watch_group()
            return
        self._reap()

    def _watch_group(self) -> None:
        """During the grace after the leader exited: reap once the group is empty."""
        assert self._pid is not None and self._reactor is not None
        if self._exited:
            return
        if not _group_alive(self._pid):
            self._reap()
            return
        self._timers.append(self._reactor.loop.call_later(GROUP_POLL_S, self._watch_group))

    def _reap(self) -> None:
        assert self._pid is not None and self._reactor is not None
        if self._exited:
            return
        loop = self._reactor.loop
        # Kill stragglers the job left in its group (a backgrounded child) before reaping the
        # leader: until it is reaped, its pid (the group id) cannot be reused by another group.
        _killpg(self._pid, signal.SIGKILL)
        _, status = os.waitpid(self._pid, 0)
        self._code = os.waitstatus_to_exitcode(status)
        if self._popen is not None:
            self._popen.returncode = self._code  # reaped here; Popen must not try again
        if self._watchdog is not None:
            self._watchdog.untrack(self._pid)
        self._exited = True
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        if self._out_fd is not None:  # the group is dead: the pipe closes at once, or never
            self._timers.append(loop.call_later(PIPE_DRAIN_S, self._give_up_output))
        self._maybe_done()

    def _give_up_output(self) -> None:
        self._close_output()
        self._maybe_done()

    def _on_timeout(self) -> None:
        if self._kill_at is not None:  # already stopping (lost lease, replace): not a timeout
            return
        self._timed_out = True
        self._terminate()

    def _terminate(self) -> None:
        """TERM to the group now, KILL after the grace period (once: a stop during a
        timeout's grace does not extend it)."""
        assert self._pid is not None and self._reactor is not None
        if self._kill_at is not None:
            return
        _killpg(self._pid, signal.SIGTERM)
        loop = self._reactor.loop
        self._kill_at = loop.time() + self._kill_grace
        self._timers.append(loop.call_at(self._kill_at, _killpg, self._pid, signal.SIGKILL))

    def _maybe_done(self) -> None:
        if not self._exited or self._out_fd is not None:
            return
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        code = self._code
        self._tail.end()
        self._report(Outcome(
            exit_code=code if code is not None and code >= 0 else None,
            signal=-code if code is not None and code < 0 else None,
            timed_out=self._timed_out,
            duration_s=time.monotonic() - self._began,
            output=self._tail.text(),
            output_bytes=self._tail.total,
        ))

    def _report(self, outcome: Outcome) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(outcome)

    def _stop(self) -> None:
        if self._exited or self._stopping:
            return
        self._stopping = True
        if self._pid is not None:
            self._terminate()
        # else start() is still to come (or failed): it sees _stopping and starts nothing

    def live_output(self, offset: int, cap: int) -> tuple[int, bytes]:
        """Reactor thread: its output after byte ``offset`` (see :meth:`OutputTail.since`)."""
        return self._tail.since(offset, cap)

    def stop(self) -> None:
        """Stop the run now (its lease was lost): TERM, grace, KILL, from any thread."""
        if self._reactor is not None:
            self._reactor.call_soon(self._stop)


def seal_inherited_fds() -> int:
    """Mark every open descriptor above 2 close-on-exec; returns how many were not. Python
    opens its own that way; this catches ones the agent inherited (from a shell, a supervisor),
    which ``posix_spawn`` would otherwise pass on to every job (Popen closes them itself)."""
    sealed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            if os.get_inheritable(fd):
                os.set_inheritable(fd, False)
                sealed += 1
    return sealed


def _executable(name: str, env: Mapping[str, str]) -> str:
    """Where ``name`` is, searched on the job's PATH (as subprocess does); OSError if nowhere."""
    if "/" in name:
        return name
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)
    return found


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


def identity_error(exc: KeyError | PermissionError) -> str:
    """What a run that cannot switch to its user records as its error."""
    return str(exc).strip("'\"")


def identity_of(user: str | None) -> dict[str, Any]:
    """Popen arguments that drop to ``user`` (its primary group, no supplementary groups).
    KeyError: no such user; PermissionError: the agent cannot switch users."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)  # KeyError: unknown user
    if os.geteuid() != 0:
        if entry.pw_uid == os.geteuid():
            return {}
        raise PermissionError(f"cannot run as user {user!r}: the agent is not running as root")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _group_alive(pgid: int) -> bool:
    """Whether a process other than the (zombie) leader is alive in group ``pgid``: a scan of
    /proc, only during a kill grace whose leader has exited."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == pgid:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class OutputTail:
    """A run's output as it comes: the last ``limit`` bytes kept for its record, the first
    LOGGED_LINES_MAX lines logged (``run_output``) through ``log`` (bound with the run id)."""

    def __init__(self, limit: int, log: Any = None) -> None:
        self._limit = limit
        self._buf = bytearray()
        self.total = 0
        self._log = log
        self._logged = 0
        self._partial = b""
        self._ended = False

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._buf += chunk
        if self._log is not None:
            if self._logged < LOGGED_LINES_MAX:
                self._stream_lines(chunk)
            else:  # counted only, for run_output_truncated
                self._logged += chunk.count(b"\n")
        if len(self._buf) > 2 * self._limit:
            del self._buf[: len(self._buf) - self._limit]

    def _stream_lines(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines[: LOGGED_LINES_MAX - self._logged]:
            self._log.info("run_output", line=line.decode("utf-8", errors="replace")[:1000])
        self._logged += len(lines)
        if self._logged >= LOGGED_LINES_MAX:
            self._partial = b""
        else:  # a line still being written keeps its start (what the log shows of it)
            self._partial = self._partial[:4096]

    def end(self) -> None:
        """The output is complete: log a last line that had no newline, and say how many
        lines were not logged (the log gets the first LOGGED_LINES_MAX of a run)."""
        if self._log is None or self._ended:
            return
        self._ended = True
        if self._partial and self._logged < LOGGED_LINES_MAX:
            self._log.info("run_output", line=self._partial.decode("utf-8", "replace")[:1000])
            self._logged += 1
        self._partial = b""
        if self._logged > LOGGED_LINES_MAX:
            self._log.info("run_output_truncated", lines_logged=LOGGED_LINES_MAX,
                           lines_not_logged=self._logged - LOGGED_LINES_MAX,
                           detail="the run's record keeps the tail (cronsul logs RUN_ID)")

    def since(self, offset: int, cap: int) -> tuple[int, bytes]:
        """The output after byte ``offset`` of the whole, as (its offset, bytes): the newest
        ``cap`` bytes at most, of what the tail still holds (the offset then says how much was
        left out). For live output (worker/live.py); reactor thread, like :meth:`feed`."""
        take = min(self.total - offset, len(self._buf), cap)
        if take <= 0:
            return self.total, b""
        return self.total - take, bytes(self._buf[len(self._buf) - take:])

    def text(self) -> str:
        if self._limit == 0:
            return ""
        tail = bytes(self._buf[-self._limit:])
        if self.total > len(tail):  # cut mid-character? start at the next character
            skip = 0
            while skip < min(3, len(tail)) and tail[skip] & 0xC0 == 0x80:
                skip += 1
            tail = tail[skip:]
        return tail.decode("utf-8", errors="replace")
