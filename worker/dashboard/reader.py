"""Reading the cluster for the dashboard: Consul (leader, nodes, paused jobs, the published
schedule) and Redis (runs, history, queues, dead letters, the recorder's keys).

Read-only, always. Run and dead-letter views come from worker/inspect_cmds.py, the code behind
``cronsul history``, ``logs`` and ``dlq``, so the dashboard and the CLI cannot disagree.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

import consul
from scheduler.errors import ConfigError
from scheduler.runs import iso_utc
from worker.config import Config, JobSpec
from worker.consulapi import CALL_TIMEOUT_S, CONSUL_ERRORS, make_clients
from worker.dashboard.recorder import DashKeys
from worker.inspect_cmds import (
    _check_entry_id,
    _dead_view,
    _in_flight,
    _records,
    _run_view,
)
from worker.keys import Keys
from worker.maintenance import NODE_MAINT_CHECK, SERVICE_MAINT_PREFIX
from worker.membership import SERVICE_NAME
from worker.metrics import queue_stats

# Next fire times shown per job.
NEXT_FIRES = 3
# Finished runs per job on the Jobs page (the strip and the chart) and on a job's page.
STRIP_RUNS = 30
JOB_PAGE_RUNS = 50
# Dead letters listed on the Queues page.
DEAD_SHOWN = 50
ELECTIONS_SHOWN = 10

View = dict[str, Any]


class Reader:
    """One request's view of the cluster. Create one per request (Consul clients are cheap)."""

    def __init__(self, cfg: Config, client: redis.Redis) -> None:
        self.cfg = cfg
        self.r = client
        self.keys = Keys(cfg.redis.key_prefix)
        self.dk = DashKeys(cfg.redis.key_prefix)
        self._c: consul.Consul = make_clients(cfg.consul, CALL_TIMEOUT_S).call
        self.consul_error: str | None = None  # set when a Consul read failed (page says so)

    # -- Consul -------------------------------------------------------------------------------

    def _consul(self, what: str, call: Any, default: Any) -> Any:
        try:
            return call()
        except CONSUL_ERRORS as exc:
            self.consul_error = f"{what}: {str(exc)[:200]}"
            return default

    def leader(self) -> View | None:
        _, entry = self._consul("leader key", lambda: self._c.kv.get(self.cfg.consul.leader_key),
                                (None, None))
        if not entry or not entry.get("Session") or not entry.get("Value"):
            return None
        try:
            value = json.loads(entry["Value"])
        except ValueError:
            return {"node": entry["Value"].decode(errors="replace"), "since": None}
        return value if isinstance(value, dict) else None

    def schedule(self) -> View:
        key = f"{self.cfg.consul.prefix}/schedule"
        _, entry = self._consul("published schedule", lambda: self._c.kv.get(key), (None, None))
        try:
            doc = json.loads(entry["Value"]) if entry and entry.get("Value") else {}
        except ValueError:
            doc = {}
        return doc if isinstance(doc, dict) else {}

    def paused(self) -> dict[str, str]:
        prefix = f"{self.cfg.consul.prefix}/paused/"
        _, entries = self._consul("paused jobs",
                                  lambda: self._c.kv.get(prefix, recurse=True), (None, None))
        out: dict[str, str] = {}
        for e in entries or []:
            if e["Key"] == prefix:
                continue
            text = (e.get("Value") or b"").decode(errors="replace")
            try:  # `cronsul pause` writes {"reason","by","at"}; an operator anything
                body = json.loads(text)
                if isinstance(body, dict):
                    text = f"{body.get('reason') or '(no reason)'} (by {body.get('by', '?')}, " \
                           f"{body.get('at', '?')})"
            except ValueError:
                pass
            out[e["Key"][len(prefix):]] = text
        return out

    def nodes(self, reference_hash: str | None) -> list[View]:
        _, entries = self._consul("nodes", lambda: self._c.health.service(SERVICE_NAME),
                                  (None, []))
        names = [e["Service"]["ID"].removeprefix(f"{SERVICE_NAME}-") for e in entries or []]
        status = self._node_status(names)
        out: list[View] = []
        for e, name in zip(entries or [], names, strict=True):
            svc = e["Service"]
            checks = {c["CheckID"]: c for c in e.get("Checks") or []}
            maint = [c for cid, c in checks.items()
                     if cid == NODE_MAINT_CHECK or cid == SERVICE_MAINT_PREFIX + svc["ID"]]
            health = [c for cid, c in checks.items() if c not in maint]
            meta = svc.get("Meta") or {}
            live = status.get(name) or {}
            out.append({
                "node": name, "address": svc.get("Address") or e["Node"].get("Address"),
                "health": "passing" if all(c["Status"] == "passing" for c in health)
                          else "critical",
                "checks": {cid: c["Status"] for cid, c in checks.items()},
                "maintenance": "; ".join(
                    ("node" if c["CheckID"] == NODE_MAINT_CHECK else "service")
                    + (f": {c.get('Notes')}" if c.get("Notes") else "") for c in maint) or None,
                "config_hash": meta.get("config_hash"),
                "drift": reference_hash is not None and meta.get("config_hash") != reference_hash,
                "role": live.get("role"), "eligible": live.get("eligible"),
                "draining": live.get("draining"), "running": live.get("running"),
                "url": live.get("url"), "seen_at": live.get("at"),
            })
        return sorted(out, key=lambda n: n["node"])

    # -- Redis: the recorder's keys ----------------------------------------------------------

    def _node_status(self, names: Sequence[str]) -> dict[str, View]:
        if not names:
            return {}
        raw: Any = self.r.mget([self.dk.node(n) for n in names])
        out: dict[str, View] = {}
        for name, value in zip(names, raw, strict=True):
            try:
                out[name] = json.loads(value) if value else {}
            except ValueError:
                out[name] = {}
        return out

    def elections(self, n: int = ELECTIONS_SHOWN) -> list[View]:
        raw: Any = self.r.lrange(self.dk.elections, 0, n - 1)
        out: list[View] = []
        for item in raw:
            try:
                out.append(json.loads(item))
            except ValueError:
                continue
        return out

    def samples(self, queue: str) -> list[tuple[int, int, int]]:
        raw: Any = self.r.lrange(self.dk.samples(queue), 0, -1)
        out: list[tuple[int, int, int]] = []
        for item in raw:
            parts = item.split()
            if len(parts) == 3 and all(p.isdigit() for p in parts):
                out.append((int(parts[0]), int(parts[1]), int(parts[2])))
        return out

    # -- Redis: jobs and runs ----------------------------------------------------------------

    def job_names(self) -> list[str]:
        return sorted(self.cfg.jobs)

    def job_exists(self, job: str) -> bool:
        return job in self.cfg.jobs or bool(self.r.exists(self.keys.history(job)))

    def finished(self, job: str, n: int) -> list[View]:
        found: Any = self.r.zrevrange(self.keys.history(job), 0, n - 1, withscores=True)
        ids = [rid.decode(errors="replace") for rid, _ in found]
        return [_run_view(rec, rid, int(score)) for rec, rid, (_, score)
                in zip(_records(self.r, self.keys, ids), ids, found, strict=True)]

    def live(self, job: str, exclude: set[str]) -> list[View]:
        """Runs of ``job`` queued, running or waiting to retry right now."""
        spec = self.cfg.jobs.get(job)
        if spec is None or self.cfg.queue.backend != "redis":
            return []
        return _in_flight(self.r, self.keys, job, spec.queue, exclude)

    def job(self, job: str, n: int, live: bool = True) -> View:
        spec = self.cfg.jobs.get(job)
        finished = self.finished(job, n)
        in_flight = self.live(job, {v["run_id"] for v in finished}) if live else []
        return {"name": job, "spec": _spec_view(spec) if spec else None,
                "live": in_flight, "finished": finished}

    def run(self, run_id: str) -> tuple[View, dict[str, str], bytes] | None:
        raw: Any = self.r.hgetall(self.keys.run(run_id))
        if not raw:
            return None
        view = _run_view(raw, run_id, None)
        params: dict[str, str] = {}
        try:
            body = json.loads(raw.get(b"payload") or b"{}")
            if isinstance(body, dict) and isinstance(body.get("params"), dict):
                params = {str(k): str(v) for k, v in body["params"].items()}
        except (ValueError, UnicodeDecodeError):
            pass
        extra = {k: raw[k.encode()].decode(errors="replace")
                 for k in ("enqueued_ms", "retry_at_ms", "waiting_for") if k.encode() in raw}
        view["retry_at"] = _ms_iso(extra.get("retry_at_ms"))
        view["waiting_for"] = extra.get("waiting_for")
        return view, params, raw.get(b"output", b"")

    # -- Redis: queues and dead letters ------------------------------------------------------

    def queue_names(self) -> list[str]:
        names = [*self.cfg.worker.queues, *sorted(j.queue for j in self.cfg.jobs.values())]
        return list(dict.fromkeys(names))

    def queues(self) -> list[View]:
        now_ms = time.time() * 1000
        out: list[View] = []
        for q in self.queue_names():
            view: View = {"queue": q, "samples": self.samples(q)}
            if self.cfg.queue.backend == "redis":
                s = queue_stats(self.r, self.keys.stream(q), now_ms)
                view.update(depth=s.depth, pending=s.pending, oldest_age_s=s.oldest_age_s)
            else:
                view.update(depth=None, pending=None, oldest_age_s=None)
            out.append(view)
        return out

    def delayed(self) -> int:
        return int(self.r.zcard(self.keys.delayed))

    def dead_letters(self, n: int = DEAD_SHOWN) -> tuple[int, list[View]]:
        total: Any = self.r.xlen(self.keys.dead)
        entries: Any = self.r.xrevrange(self.keys.dead, "+", "-", count=n)
        return int(total), [_dead_view(eid, fields) for eid, fields in entries]

    def dead_letter_exists(self, entry_id: str) -> bool:
        try:
            _check_entry_id(entry_id)
        except ConfigError:
            return False
        return bool(self.r.xrange(self.keys.dead, entry_id, entry_id))


def _spec_view(spec: JobSpec) -> View:
    now = datetime.now(UTC)
    fires: list[datetime] = []
    after = now
    while len(fires) < NEXT_FIRES:
        nxt = spec.schedule.next_fire(after)
        if nxt is None:
            break
        fires.append(nxt)
        after = nxt
    return {
        "schedule": spec.schedule.expression, "timezone": spec.timezone, "queue": spec.queue,
        "next": [iso_utc(t) for t in fires],
        "next_local": [_local(t, spec.timezone) for t in fires],
        "params": sorted(spec.param_names), "param_sets": len(spec.params),
        "overlap": spec.overlap, "retries": spec.retries,
        "timeout_s": spec.timeout.total_seconds(),
        "command": list(spec.command) if spec.callable is None else None,
        "callable": spec.callable,
    }


def _local(when: datetime, tz: str) -> str:
    from zoneinfo import ZoneInfo

    return when.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _ms_iso(text: str | None) -> str | None:
    if not text or not text.isdigit():
        return None
    return iso_utc(datetime.fromtimestamp(int(text) / 1000, UTC))


def age(iso: str | None, now: datetime | None = None) -> str:
    """"3m 12s ago" for an ISO 8601 UTC time."""
    if not iso:
        return "-"
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    delta = (now or datetime.now(UTC)) - then
    return f"{duration(delta)} ago" if delta >= timedelta(0) else f"in {duration(-delta)}"


def duration(delta: timedelta) -> str:
    s = int(delta.total_seconds())
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
