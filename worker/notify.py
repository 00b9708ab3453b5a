"""Failure notifications: ``[notify] command`` runs once for each run that ended failed or dead.

cron mails a failed job's output (MAILTO); Jenkins and dkron page or post on failure. cronsul
runs the operator's command (a Slack webhook script, ``mail``, a pager CLI) on the node that
recorded the end, with the run in its environment (``CRONSUL_NOTIFY_*`` plus the run's
``CRONSUL_PARAM_*``) and the output tail on its stdin. The run is already recorded: a
notification that fails or times out is logged (``notify_failed``), never retried, and never
changes the run. At most once: a node that dies between recording the end and notifying sends
nothing (metrics and ``cronsul status`` still show the failure).

One thread per agent runs the commands one at a time from a bounded queue, so a slow or hung
command delays notices, never runs; a flood beyond the queue is dropped and counted in one line
(``notify_dropped``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import structlog

from worker.executor import job_environment
from worker.jobspec import env_table
from worker.tomlread import Section

# The states a notice can be asked for: what a run ends as when it did not succeed.
NOTIFY_STATES = ("failed", "dead", "retrying")
# Notices waiting for the command. A burst of failures (a database down: every job fails at
# once) beyond this is dropped with one line saying how many; a backlog longer than this would
# page about a past that `cronsul status` shows better.
NOTIFY_QUEUE_MAX = 200
# What the command's own output may add to the agent's log line when it fails.
COMMAND_OUTPUT_LOGGED = 2000


@dataclass(frozen=True)
class NotifySection:
    """``[notify]``: no command (the default) sends nothing."""

    command: tuple[str, ...] | None = None
    on: tuple[str, ...] = ("failed", "dead")
    timeout: timedelta = timedelta(seconds=30)
    # Over the base environment jobs get (BASE_ENV): a webhook URL, a token. The agent's own
    # environment (CONSUL_HTTP_TOKEN, AWS keys) is never passed on, as for jobs.
    env: tuple[tuple[str, str], ...] = ()


def notify_section(s: Section) -> NotifySection:
    command = s.strings("command")
    if command is not None and (not command or not command[0]):
        raise s.fail("command", "must be a non-empty argv list, e.g. "
                                "[\"/usr/local/bin/page-oncall\", \"--team\", \"batch\"]")
    on = s.strings("on")
    for state in on or ():
        if state not in NOTIFY_STATES:
            raise s.fail("on", f"{state!r} is not a state a run can fail in: one of "
                               f"{', '.join(NOTIFY_STATES)}")
    timeout = s.duration("timeout", "30s", low=timedelta(seconds=1))
    env = env_table(s)
    s.check_unknown()
    return NotifySection(tuple(command) if command else None,
                         tuple(on) if on is not None else NotifySection.on, timeout,
                         tuple(sorted(env.items())))


@dataclass(frozen=True)
class Notice:
    """A run that ended as one of ``[notify] on``."""

    run_id: str
    job: str
    state: str
    node: str
    attempt: int | None
    scheduled_at: str
    error: str
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    duration_ms: float = 0.0
    params: Mapping[str, str] = field(default_factory=dict)
    output: str = ""

    def environment(self) -> dict[str, str]:
        env = {
            "CRONSUL_NOTIFY_RUN_ID": self.run_id, "CRONSUL_NOTIFY_JOB": self.job,
            "CRONSUL_NOTIFY_STATE": self.state, "CRONSUL_NOTIFY_NODE": self.node,
            "CRONSUL_NOTIFY_ATTEMPT": "" if self.attempt is None else str(self.attempt),
            "CRONSUL_NOTIFY_SCHEDULED_AT": self.scheduled_at,
            "CRONSUL_NOTIFY_ERROR": self.error,
            "CRONSUL_NOTIFY_EXIT_CODE": "" if self.exit_code is None else str(self.exit_code),
            "CRONSUL_NOTIFY_SIGNAL": "" if self.signal is None else str(self.signal),
            "CRONSUL_NOTIFY_TIMED_OUT": "1" if self.timed_out else "0",
            "CRONSUL_NOTIFY_DURATION_MS": f"{self.duration_ms:.1f}",
        }
        env.update((f"CRONSUL_PARAM_{k.upper()}", v) for k, v in self.params.items())
        return env


class Notifier:
    """Runs ``[notify] command`` for each notice, one at a time, on its own thread."""

    def __init__(self, section: NotifySection, agent_env: Mapping[str, str], node: str) -> None:
        self._section = section
        self._base_env = job_environment(agent_env, (), {})  # what a job gets, no secrets
        self._queue: queue.Queue[Notice | None] = queue.Queue(maxsize=NOTIFY_QUEUE_MAX)
        self._dropped = 0  # since the last notice that got in (notifier thread reads it)
        self._lock = threading.Lock()  # the drop count, the thread's start, the running command
        self._thread: threading.Thread | None = None
        self._running: subprocess.Popen[bytes] | None = None
        self._log = structlog.get_logger("cronsul.notify").bind(node=node)

    def configure(self, section: NotifySection) -> None:
        """A reload: the next notices use the new command (one already running finishes)."""
        self._section = section

    def wants(self, state: str) -> bool:
        return self._section.command is not None and state in self._section.on

    def offer(self, notice: Notice) -> None:
        """Queue a notice; never blocks (a full queue drops it, counted)."""
        if not self.wants(notice.state):
            return
        with self._lock:  # the finisher and the fetch thread both offer
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="notifier",
                                                daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(notice)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """At shutdown: let the queued notices go out for up to ``timeout_s``, then kill the
        command still running (its process group), so none outlives the agent."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        thread.join(timeout_s)
        with self._lock:
            running = self._running
        if running is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.pid, signal.SIGKILL)

    def _loop(self) -> None:
        while (notice := self._queue.get()) is not None:
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                self._log.error("notify_dropped", count=dropped, queue_max=NOTIFY_QUEUE_MAX,
                                detail="more failures at once than the notify queue holds")
            try:
                self._send(notice)
            except Exception as exc:  # one notice's problem must not end the notifier
                self._log.exception("notify_failed", run_id=notice.run_id, job=notice.job,
                                    state=notice.state, error=f"{type(exc).__name__}: {exc}")

    def _send(self, notice: Notice) -> None:
        section = self._section
        if section.command is None:
            return
        argv: Sequence[str] = section.command
        env = {**self._base_env, **dict(section.env), **notice.environment()}
        where = {"run_id": notice.run_id, "job": notice.job, "state": notice.state}
        # stdin (the output tail) and stdout are files, not pipes: a command's child that
        # escapes its process group (setsid, a daemon) cannot hold the notifier up by keeping
        # a pipe open (a review's did, past the timeout, and the notices behind it were lost).
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out:
            stdin.write(notice.output.encode("utf-8", "replace"))
            stdin.seek(0)
            try:
                proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True, cwd=os.sep)
            except OSError as exc:
                self._log.error("notify_failed", **where, error=f"cannot run {argv[0]}: {exc}")
                return
            with self._lock:
                self._running = proc
            try:
                code: int | None = proc.wait(timeout=section.timeout.total_seconds())
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # its whole process group
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
            finally:
                with self._lock:
                    self._running = None
            out.seek(max(0, out.seek(0, os.SEEK_END) - COMMAND_OUTPUT_LOGGED))
            said = out.read().decode("utf-8", "replace")
        if code is None:
            self._log.error("notify_failed", **where, error=f"timed out after "
                            f"{section.timeout.total_seconds():g}s", output=said)
        elif code != 0:
            self._log.error("notify_failed", **where, error=f"exit code {code}", output=said)
        else:
            self._log.info("notify_sent", **where)
