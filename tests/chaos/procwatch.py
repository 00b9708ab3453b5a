"""Watches /proc for the chaos run's job processes (found by the marker in their environment).

Each job runs in its own process group (session), so one execution = one process group id; the
group's processes carry CRONSUL_RUN_ID, CRONSUL_ATTEMPT and CRONSUL_NODE. Sampling every 0.1 s,
it records when each execution was first and last seen alive (zombies count as dead) and flags,
in the sample itself, two executions of the same run id alive at once (an overlap), plus, for
jobs declared overlap=skip, two runs of the same job alive at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field

SAMPLE_S = 0.1


@dataclass
class Execution:
    pgid: int
    run_id: str
    job: str
    attempt: str
    node: str
    first_seen: float  # time.time()
    last_seen: float
    pids: set[int] = field(default_factory=set)
    alive: bool = True


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, pgid) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    head, _, rest = raw.rpartition(")")
    comm = head.partition("(")[2]
    fields = rest.split()
    if len(fields) < 3:
        return None
    return comm, fields[0], int(fields[2])


def _environ(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def pool_workers(parent: int, tag: bytes = b"cronsul-pyworker") -> set[int]:
    """The warm Python processes (callable jobs run inside them) whose parent is ``parent``:
    their environment is the agent's base one, so the marker cannot find them."""
    out: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rpartition(b")")[2].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if tag in f.read().split(b"\0"):
                    out.add(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def living(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie is dead)."""
    return {pid for pid in pids if (st := _stat(pid)) is not None and st[1] != "Z"}


class ProcWatch:
    def __init__(self, marker: str, skip_jobs: frozenset[str] = frozenset()) -> None:
        self.marker = marker
        self.skip_jobs = skip_jobs
        self.executions: dict[int, Execution] = {}  # by pgid: the latest with that id
        self.history: list[Execution] = []  # every execution ever seen (pids get reused)
        self.overlaps: list[tuple[float, str, list[tuple[str, str, int]]]] = []
        self.job_overlaps: list[tuple[float, str, list[str]]] = []
        self._pid_exec: dict[int, int] = {}  # pid -> pgid of a tracked execution
        self._ignored: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="procwatch", daemon=True)
        self.scans = 0

    def start(self) -> ProcWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.scan()

    def scan(self) -> None:
        with self._lock:
            self._scan()

    def _scan(self) -> None:
        now = time.time()
        self.scans += 1
        try:
            pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        except OSError:
            return
        self._ignored &= pids
        for pid in pids - self._ignored - self._pid_exec.keys():
            st = _stat(pid)
            if st is None:
                continue
            comm, state, pgid = st
            env = _environ(pid)
            if env is None or env.get("CHAOS_MARKER") != self.marker or state == "Z":
                # A Python process may be an agent's child between fork and exec: look again.
                if not comm.startswith("python") and env is not None:
                    self._ignored.add(pid)
                continue
            ex = self.executions.get(pgid)
            if ex is None or not ex.alive:
                run_id = env.get("CRONSUL_RUN_ID", "?")
                ex = Execution(pgid, run_id, env.get("CRONSUL_JOB", "?"),
                               env.get("CRONSUL_ATTEMPT", "?"), env.get("CRONSUL_NODE", "?"),
                               now, now)
                self.executions[pgid] = ex
                self.history.append(ex)
            ex.pids.add(pid)
            self._pid_exec[pid] = pgid
        alive_by_run: dict[str, list[Execution]] = {}
        alive_by_job: dict[str, list[Execution]] = {}
        for pgid, ex in self.executions.items():
            if not ex.alive:
                continue
            live = set()
            for pid in ex.pids:
                st = _stat(pid)
                if st is not None and st[1] != "Z" and st[2] == pgid:
                    live.add(pid)
            for pid in ex.pids - live:
                self._pid_exec.pop(pid, None)
            ex.pids = live
            if not live:
                ex.alive = False
                continue
            ex.last_seen = now
            alive_by_run.setdefault(ex.run_id, []).append(ex)
            if ex.job in self.skip_jobs:
                alive_by_job.setdefault(ex.job, []).append(ex)
        for run_id, group in alive_by_run.items():
            if len(group) > 1:
                self.overlaps.append((now, run_id, [(e.node, e.attempt, e.pgid) for e in group]))
        for job, group in alive_by_job.items():
            if len({e.run_id for e in group}) > 1:
                self.job_overlaps.append((now, job, sorted({e.run_id for e in group})))

    def alive(self, node: str | None = None) -> list[Execution]:
        """Executions alive right now (a fresh scan), optionally of one node only."""
        self.scan()
        with self._lock:
            return [e for e in self.executions.values()
                    if e.alive and (node is None or e.node == node)]

    def kill_all(self) -> int:
        """SIGKILL every live execution's group (cleanup after counting orphans)."""
        groups = self.alive()
        for ex in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(ex.pgid, signal.SIGKILL)
        return len(groups)
