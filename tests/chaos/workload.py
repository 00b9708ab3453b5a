"""The chaos workload: every job the cluster runs, and what each job promises.

This is the one place to change when cronsul grows features. ``overlap`` and ``retries`` are not
implemented by cronsul yet; when they are, set them on the jobs below (``overlap="skip"`` on a
job that runs longer than its interval, ``retries=2`` on the failing job). ``toml()`` passes
them through to the agents' config and ``checks.py`` already reads them: an overlap=skip job
must never have two runs alive at once (any run ids), and a job with retries may complete
1 + retries attempts per tick instead of one.

Every job is ``bash -c SCRIPT <marker> [param]`` (or, for the callable jobs, PYJOB's ``mark``
run in the agents' warm Python processes) and appends, to a file of its own, one line at start
and one at end (a short O_APPEND write is atomic, so nodes never interleave lines):

    <run id> <scheduled at> <node> start|end <epoch ns> <attempt> <shell pid> <argv app>:<env app>

The first five fields are the documented format; attempt, pid and the fan-out check are extra.
The marker (argv[0] and CHAOS_MARKER in the environment) lets the process watcher find every
job process of this chaos run in /proc, and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scheduler.runs import Run

FANOUT_SETS = 50

SCRIPT = r"""
o="$CHAOS_OUT"
w() { printf '%s %s %s %s %s %s %s %s\n' "$CRONSUL_RUN_ID" "$CRONSUL_SCHEDULED_AT" \
      "$CRONSUL_NODE" "$1" "${EPOCHREALTIME/./}000" "$CRONSUL_ATTEMPT" "$$" \
      "${2:--}:${CRONSUL_PARAM_APP:--}" >> "$o"; }
w start "$1"
sleep "$CHAOS_SLEEP"
w end "$1"
exit "$CHAOS_EXIT"
"""

# The callable jobs' code, written next to the agents' code snapshot (importable as PYJOB_MODULE
# by their warm Python processes). Same lines as SCRIPT; the pid is the warm process's.
PYJOB_MODULE = "chaos_pyjob"
PYJOB = r"""
import os
import time


def mark(app: str = "-") -> None:
    def w(what: str) -> None:
        e = os.environ
        line = (f"{e['CRONSUL_RUN_ID']} {e['CRONSUL_SCHEDULED_AT']} {e['CRONSUL_NODE']} {what} "
                f"{time.time_ns()} {e['CRONSUL_ATTEMPT']} {os.getpid()} "
                f"{app}:{e.get('CRONSUL_PARAM_APP', '-')}\n")
        fd = os.open(e["CHAOS_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    w("start")
    time.sleep(float(os.environ["CHAOS_SLEEP"]))
    w("end")
    if os.environ["CHAOS_EXIT"] != "0":
        raise SystemExit(int(os.environ["CHAOS_EXIT"]))
"""


@dataclass(frozen=True)
class WorkloadJob:
    name: str
    period_s: int  # every job fires every period_s seconds, aligned to the minute
    sleep_s: float
    timeout_s: float
    exit_code: int = 0
    params: tuple[dict[str, str], ...] = ()
    # None/0 = not emitted (the job allows overlap, failures are final).
    overlap: str | None = None
    retries: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    callable: bool = False  # PYJOB's mark in the warm Python pool instead of bash

    @property
    def schedule(self) -> str:
        return "* * * * * *" if self.period_s == 1 else f"*/{self.period_s} * * * * *"

    def toml(self, outdir: Path, marker: str) -> dict[str, Any]:
        argv = ["/bin/bash", "-c", SCRIPT, marker]
        if self.params:
            argv.append("{param.app}")  # a whole argv element, never spliced into the script
        run: dict[str, Any] = ({"callable": f"{PYJOB_MODULE}:mark"} if self.callable
                               else {"command": argv})
        body: dict[str, Any] = {
            "schedule": self.schedule,
            **run,
            "timeout": f"{self.timeout_s:g}s",
            "env": {"CHAOS_MARKER": marker, "CHAOS_OUT": str(self.out_file(outdir)),
                    "CHAOS_SLEEP": f"{self.sleep_s:g}", "CHAOS_EXIT": str(self.exit_code)},
        }
        if self.params:
            body["params"] = [dict(p) for p in self.params]
        if self.overlap is not None:
            body["overlap"] = self.overlap
        if self.retries:
            body["retries"] = self.retries
        body.update(self.extra)
        return body

    def out_file(self, outdir: Path) -> Path:
        return outdir / f"{self.name}.out"

    def max_completions(self) -> int:
        """How many executions of one run id may run to the end (exit 1 is retried)."""
        return 1 + (self.retries if self.exit_code != 0 else 0)

    def ticks(self, after: float, until: float) -> Iterator[datetime]:
        """Scheduled times t with after < t <= until (epoch seconds)."""
        t = (int(after) // self.period_s + 1) * self.period_s
        while t <= until:
            yield datetime.fromtimestamp(t, UTC)
            t += self.period_s

    def run_ids(self, tick: datetime) -> list[str]:
        if not self.params:
            return [Run.for_tick(self.name, tick).run_id]
        return [Run.for_tick(self.name, tick, p).run_id for p in self.params]


def workload() -> list[WorkloadJob]:
    return [
        # A 1-second job: every leaderless second shows up here first.
        WorkloadJob("every1s", period_s=1, sleep_s=0.3, timeout_s=10),
        # A 10-second job.
        WorkloadJob("every10s", period_s=10, sleep_s=1.0, timeout_s=10),
        # Fan-out: 50 runs per tick; {param.app} as an argv element and $CRONSUL_PARAM_APP.
        WorkloadJob("fanout", period_s=10, sleep_s=0.5, timeout_s=10,
                    params=tuple({"app": f"a{i}"} for i in range(FANOUT_SETS))),
        # Long: 7 s of an 8 s timeout, longer than the 4 s visibility timeout (lease renewal).
        WorkloadJob("long", period_s=10, sleep_s=7.0, timeout_s=8),
        # Fails every second (exit 1): a failed run is terminal and must not run again.
        WorkloadJob("failing", period_s=1, sleep_s=0.1, timeout_s=10, exit_code=1),
        # overlap = skip, longer than its interval: every other tick finds the lock held and is
        # recorded skipped; two runs of the job must never be alive at once, cluster-wide.
        WorkloadJob("skipper", period_s=2, sleep_s=3.0, timeout_s=10, overlap="skip"),
        # Fails and retries: attempts 1..3 (backoff 1 s, 2 s), then dead with a dead letter.
        WorkloadJob("retrying", period_s=5, sleep_s=0.1, timeout_s=10, exit_code=1, retries=2,
                    extra={"retry_backoff": "1s", "retry_backoff_max": "2s"}),
        # A fan-out whose jitter spreads its 10 parameter sets over 4 s: each run waits in the
        # delayed set until its own offset, through failovers and Redis restarts.
        WorkloadJob("jittered", period_s=10, sleep_s=0.2, timeout_s=10,
                    params=tuple({"app": f"j{i}"} for i in range(10)), extra={"jitter": "4s"}),
        # Callables in the warm Python pool: one a second, and a burst of 20 short ones every
        # 5 s, more than a node's 2 warm processes (python_workers), so runs queue inside them
        # (python_prefetch) while nodes die, freeze and restart around them.
        WorkloadJob("pyjob", period_s=1, sleep_s=0.05, timeout_s=10, callable=True),
        WorkloadJob("pyfan", period_s=5, sleep_s=0.01, timeout_s=10, callable=True,
                    params=tuple({"app": f"p{i}"} for i in range(20))),
    ]


def jobs_config(jobs: list[WorkloadJob], outdir: Path, marker: str) -> dict[str, dict[str, Any]]:
    for job in jobs:
        job.out_file(outdir).touch()
    return {job.name: job.toml(outdir, marker) for job in jobs}
