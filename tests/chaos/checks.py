"""The invariants, checked after the run from what the jobs wrote, the run records in Redis, the
agents' logs and the process watcher.

* duplicates: a run id that ran to the end more often than its job allows (once; 1 + retries
  for a failing job with retries), or that started again after a run of it had finished. The one
  excuse is the at-least-once window every queue has: the node that ran it was killed (kill -9)
  within a second after the job's last line, or was frozen (SIGSTOP) when the job ended or
  within a second after, so it could not record the result before its lease lapsed; those are
  counted as ``reexecuted_after_crash`` and listed, not failed.
* overlaps: two executions of one run id alive at the same moment: from the job's own start/end
  lines (an execution killed before its end line lasts until the watcher last saw it alive), and
  from the watcher's samples directly. For overlap=skip jobs, two runs of the job at once.
* lost: a tick inside the window (first leader + 2 s .. end of the settle period) with no run at
  all, unless an agent logged it in ``ticks_missed`` (then it is ``missed``, reported apart);
  a run record scheduled inside the window that is neither terminal nor running under a live
  lease once the cluster has settled; a run recorded as succeeded that no job line shows.
* orphans: counted by the runner (job processes alive with no live agent to vouch for them).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from chaos.procwatch import ProcWatch
from chaos.workload import WorkloadJob

TERMINAL = ("succeeded", "failed", "dead", "skipped")
# kill -9 / SIGSTOP this soon after a job's end line excuses a re-execution (see above).
CRASH_EXCUSE_S = 1.0


@dataclass
class Exec:
    run_id: str
    scheduled_at: str
    node: str
    pid: int
    attempt: str
    start_ns: int | None = None
    end_ns: int | None = None
    app: str = "-:-"


@dataclass
class Report:
    ticks: int = 0
    duplicates: int = 0
    lost: int = 0
    overlaps: int = 0
    missed: int = 0
    skipped: int = 0  # overlap = skip: recorded skipped by policy, never executed
    executions: int = 0
    redelivered: int = 0
    reexecuted_after_crash: int = 0
    timeouts: int = 0
    records: int = 0
    details: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, text: str) -> None:
        self.details[kind].append(text)


def parse_job_lines(path: Path, report: Report) -> dict[str, list[Exec]]:
    """run id -> executions (one per node+shell pid), from a job's output file."""
    by_key: dict[tuple[str, str, int], Exec] = {}  # pids wrap around (pid_max 32768)
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if len(parts) != 8 or parts[3] not in ("start", "end"):
            report.add("bad_line", f"{path.name}:{n}: {line!r}")
            continue
        run_id, sched, node, event, ns, attempt, pid, app = parts
        ex = by_key.setdefault((run_id, node, int(pid)),
                               Exec(run_id, sched, node, int(pid), attempt))
        if event == "start":
            ex.start_ns = int(ns)
        else:
            ex.end_ns = int(ns)
        ex.app = app
    runs: dict[str, list[Exec]] = defaultdict(list)
    for ex in by_key.values():
        runs[ex.run_id].append(ex)
    return runs


def scheduled_of(run_id: str) -> float:
    return int(run_id.split("@", 1)[1].split("#", 1)[0]) / 1000


def missed_ticks(logs: list[Path], jobs: dict[str, WorkloadJob], report: Report
                 ) -> dict[str, set[float]]:
    """job -> scheduled epoch seconds the agents logged as missed (``ticks_missed``)."""
    out: dict[str, set[float]] = defaultdict(set)
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if '"ticks_missed"' not in line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            job = jobs.get(ev.get("job", ""))
            if job is None:
                continue
            first = _epoch(ev["first"])
            last = _epoch(ev["last"])
            ticks = {t.timestamp() for t in job.ticks(first - 0.001, last)}
            if len(ticks) != int(ev.get("count", len(ticks))):
                report.add("missed_log", f"{log.name}: count {ev.get('count')} but "
                           f"{len(ticks)} ticks in {ev['first']}..{ev['last']}")
                ticks = {_epoch(t) for t in ev.get("ticks", [])}
            out[job.name] |= ticks
    return out


def max_tick_lag(logs: list[Path], lo: float, hi: float) -> float:
    """The longest time any tick waited for its enqueue (``ticks_enqueued`` max_lag_ms, logged
    by whichever agent led), for passes inside the window: the scheduling gap users saw, which
    is what a failover costs (an abandoned session still holding the key counts too)."""
    worst = 0.0
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if '"ticks_enqueued"' not in line:
                continue
            try:
                ev = json.loads(line)
                at = _epoch(ev["at"])
            except (ValueError, KeyError):
                continue
            if lo < at <= hi:
                worst = max(worst, float(ev.get("max_lag_ms", 0)) / 1000)
    return worst


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def load_records(client: redis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    records: dict[str, dict[str, str]] = {}
    keys = list(client.scan_iter(match=f"{prefix}:run:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.hgetall(k)
    for k, raw in zip(keys, pipe.execute(), strict=True):
        run_id = k.decode()[len(f"{prefix}:run:"):]
        records[run_id] = {a.decode(): b.decode(errors="replace") for a, b in raw.items()}
    return records


def live_leases(client: redis.Redis, prefix: str, run_ids: list[str]) -> set[str]:
    pipe = client.pipeline(transaction=False)
    for r in run_ids:
        pipe.exists(f"{prefix}:lease:{r}")
    return {r for r, n in zip(run_ids, pipe.execute(), strict=True) if n}


def unsettled(records: dict[str, dict[str, str]], leases: set[str], until: float) -> list[str]:
    """Run ids scheduled up to ``until`` that are neither terminal nor legitimately running."""
    return sorted(r for r, rec in records.items()
                  if scheduled_of(r) <= until and not r.split("@", 1)[1].startswith("manual")
                  and rec.get("state") not in TERMINAL
                  and not (rec.get("state") == "running" and r in leases))


def check(jobs: list[WorkloadJob], outdir: Path, logs: list[Path],
          records: dict[str, dict[str, str]], leases: set[str], window: tuple[float, float],
          marks: dict[str, list[tuple[float, str]]], watch: ProcWatch) -> Report:
    """``marks``: node -> [(epoch seconds, "kill9"|"stop"|...)] as the injector did them."""
    report = Report()
    by_name = {j.name: j for j in jobs}
    runs: dict[str, list[Exec]] = {}
    for job in jobs:
        runs.update(parse_job_lines(job.out_file(outdir), report))
    report.records = len(records)
    last_seen = {(e.run_id, e.pgid): e.last_seen for e in watch.history}

    for run_id, execs in runs.items():
        job = by_name.get(run_id.split("@", 1)[0])
        report.executions += len(execs)
        if job is None:
            report.add("bad_line", f"unknown job in run id {run_id}")
            continue
        for ex in execs:
            expect = datetime.fromtimestamp(scheduled_of(run_id), UTC)
            if _epoch(ex.scheduled_at) != expect.timestamp():
                report.add("bad_line", f"{run_id}: CRONSUL_SCHEDULED_AT {ex.scheduled_at}")
            argv_app, _, env_app = ex.app.partition(":")
            if argv_app != env_app or (job.params and argv_app == "-"):
                report.add("param_mismatch", f"{run_id} on {ex.node}: argv {argv_app!r} "
                           f"env {env_app!r}")
        if len(execs) > 1:
            report.redelivered += 1
        _duplicates(run_id, job, execs, marks, report)
        _overlaps(run_id, execs, last_seen, report)

    for when, run_id, group in watch.overlaps:
        text = f"{run_id}: alive at once at {_ts(when)}: {group}"
        if not any(d.startswith(run_id + ":") for d in report.details["overlaps"]):
            report.add("overlaps", text)
    for when, job, run_ids in watch.job_overlaps:
        report.add("overlaps", f"overlap=skip job {job}: {run_ids} alive at {_ts(when)}")
    report.overlaps = len({d.split(":", 1)[0] for d in report.details["overlaps"]})

    missed = missed_ticks(logs, by_name, report)
    lo, hi = window
    for job in jobs:
        for tick in job.ticks(lo, hi):
            for run_id in job.run_ids(tick):
                report.ticks += 1
                if run_id in runs:
                    continue
                if tick.timestamp() in missed.get(job.name, set()):
                    report.missed += 1
                    continue
                rec = records.get(run_id)
                if rec is not None and rec.get("state") == "skipped" and job.overlap == "skip":
                    report.skipped += 1  # the previous run still held the job's lock
                    continue
                report.lost += 1
                report.add("lost", f"{run_id} ({tick:%H:%M:%S}): never ran; record "
                           f"{_short(rec)}")
    for run_id in unsettled(records, leases, hi):
        if run_id in runs and records[run_id].get("state") == "running":
            what = "ran but its record never reached a terminal state and has no lease"
        else:
            what = "unsettled"
        report.lost += 1
        report.add("lost", f"{run_id}: {what}: {_short(records[run_id])}")
    for run_id, rec in records.items():
        if rec.get("timed_out") == "1":
            report.timeouts += 1
        if rec.get("state") == "succeeded" and not any(
                e.end_ns for e in runs.get(run_id, [])):
            report.lost += 1
            report.add("lost", f"{run_id}: recorded succeeded but no job line shows it ran "
                       "to the end")
    return report


def _duplicates(run_id: str, job: WorkloadJob, execs: list[Exec],
                marks: dict[str, list[tuple[float, str]]], report: Report) -> None:
    done = sorted((e for e in execs if e.end_ns is not None), key=lambda e: e.end_ns or 0)
    bad = False
    for first in done:
        end_s = (first.end_ns or 0) / 1e9
        after = [e for e in execs if e is not first and (e.start_ns or 0) > (first.end_ns or 0)]
        later = [e for e in after if not _retry_of(job, first, e)]
        # A node that died before recording a finished run: the run is delivered again, as a
        # new attempt (on_lost = retry), so for a job with retries the re-run looks like the
        # retry policy at work; it is excused all the same, once.
        excused = bool(after) and _crashed_around(marks.get(first.node, []), end_s)
        if excused and len(done) <= job.max_completions() + 1:
            report.reexecuted_after_crash += 1
            report.add("reexecuted_after_crash", f"{run_id}: finished on {first.node} at "
                       f"{_ts(end_s)}, node crashed/froze before recording; ran again on "
                       f"{[e.node for e in after]}")
            continue
        if not later:
            continue
        bad = True
        report.add("duplicates", f"{run_id}: finished on {first.node} (attempt "
                   f"{first.attempt}) at {_ts(end_s)}, then started again on "
                   f"{[(e.node, e.attempt, _ts((e.start_ns or 0) / 1e9)) for e in later]}")
    if not bad and len(done) > job.max_completions() and not any(
            d.startswith(run_id + ":") for d in report.details["reexecuted_after_crash"]):
        bad = True
        report.add("duplicates", f"{run_id}: ran to the end {len(done)} times: "
                   f"{[(e.node, e.attempt) for e in done]}")
    if bad:
        report.duplicates += 1


def _retry_of(job: WorkloadJob, failed: Exec, later: Exec) -> bool:
    """``later`` is the retry policy at work: the job fails by design, has retries, and
    ``later`` is a later attempt (how many may complete is bounded by max_completions)."""
    if job.exit_code == 0 or not job.retries:
        return False
    try:
        return int(later.attempt) > int(failed.attempt)
    except ValueError:
        return False


def _crashed_around(marks: list[tuple[float, str]], end_s: float) -> bool:
    """The node was killed within CRASH_EXCUSE_S after ``end_s``, or was frozen (SIGSTOP, not
    yet SIGCONT) at ``end_s`` or within CRASH_EXCUSE_S after it: it could not record the
    result before its lease lapsed."""
    for i, (t, kind) in enumerate(marks):
        if kind == "kill9" and end_s - 0.05 <= t <= end_s + CRASH_EXCUSE_S:
            return True
        if kind == "stop" and t <= end_s + CRASH_EXCUSE_S:
            cont = next((t2 for t2, k2 in marks[i + 1:] if k2 == "cont"), None)
            if cont is None or cont >= end_s:
                return True
    return False


def _overlaps(run_id: str, execs: list[Exec], last_seen: dict[tuple[str, int], float],
              report: Report) -> None:
    spans = []
    for e in execs:
        if e.start_ns is None:
            continue
        start = e.start_ns / 1e9
        end = (e.end_ns / 1e9 if e.end_ns is not None
               else max(start, last_seen.get((run_id, e.pid), start)))
        spans.append((start, end, e))
    spans.sort(key=lambda s: s[0])
    if not spans:
        return
    s1, e1, a = spans[0]
    for s2, e2, b in spans[1:]:
        if s2 < e1:
            report.add("overlaps", f"{run_id}: {a.node}/attempt {a.attempt} "
                       f"{_ts(s1)}..{_ts(e1)} and {b.node}/attempt {b.attempt} from {_ts(s2)}")
            return
        if e2 > e1:
            s1, e1, a = s2, e2, b


def _ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S.%f")[:-3]


def _short(rec: dict[str, str] | None) -> str:
    if rec is None:
        return "none"
    keep = ("state", "node", "attempt", "exit_code", "signal", "timed_out", "error")
    return "{" + ", ".join(f"{k}={rec[k]}" for k in keep if rec.get(k)) + "}"


def summary_fields(report: Report) -> dict[str, Any]:
    return {"ticks": report.ticks, "duplicates": report.duplicates, "lost": report.lost,
            "overlaps": report.overlaps}
