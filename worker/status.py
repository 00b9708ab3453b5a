"""`cronsul status`: the cluster as an operator needs it, from Consul and Redis.

Leader and since when; every node with health, eligibility, draining (maintenance), config-hash
drift against the leader's published schedule and its runs in flight; queue depth and
oldest-entry age per queue; dead letters; paused jobs; recent failures.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from scheduler.errors import ConnectionFailure
from scheduler.runs import from_epoch_ms, iso_utc
from worker.config import Config
from worker.consulapi import CALL_TIMEOUT_S, CONSUL_ERRORS, make_clients
from worker.keys import GROUP, Keys
from worker.maintenance import maintenance_reason
from worker.metrics import queue_stats
from worker.secretfiles import redact

# Recent failures shown: the newest few across all jobs, from each job's last runs.
RECENT_FAILURES = 10
RUNS_PER_JOB = 20
MAINTENANCE_PREFIXES = ("_node_maintenance", "_service_maintenance:")


def _json(value: bytes | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        body = json.loads(value)
    except ValueError:
        return {"raw": value.decode(errors="replace")}
    return body if isinstance(body, dict) else {"raw": body}


def gather(cfg: Config, redis_client: redis.Redis) -> dict[str, Any]:
    """Everything `status` shows. Raises ConnectionFailure when Consul cannot be reached; a
    Redis outage is reported in the result (``redis_error``) rather than hiding Consul's view."""
    c = make_clients(cfg.consul, CALL_TIMEOUT_S).call
    prefix = cfg.consul.prefix
    try:
        _, entry = c.kv.get(cfg.consul.leader_key)
        _, nodes = c.health.service("cronsul")
        _, published = c.kv.get(f"{prefix}/schedule")
        _, paused = c.kv.get(f"{prefix}/paused/", recurse=True)
        _, known = c.kv.get(f"{prefix}/nodes/", recurse=True)
    except CONSUL_ERRORS as exc:
        raise ConnectionFailure(f"cannot reach Consul at {cfg.consul.host}:{cfg.consul.port}: "
                                f"{exc}") from exc
    leader = _json(entry.get("Value")) if entry and entry.get("Session") else None
    schedule = _json(published.get("Value")) if published else {}
    reference = schedule.get("config_hash") or cfg.config_hash
    report: dict[str, Any] = {
        "leader": leader,
        "schedule_config_hash": reference,
        # Each pause as the object `cronsul pause` wrote ({"reason": ..., ...}), not a string
        # of JSON inside the JSON; a value that is not JSON stays its text.
        "paused": {e["Key"].rsplit("/", 1)[-1]: _pause_value(e.get("Value"))
                   for e in paused or [] if not e["Key"].endswith("/")},
        "nodes": [],
    }
    for n in nodes or []:
        svc = n["Service"]
        meta = svc.get("Meta") or {}
        raw = {ch["CheckID"]: ch for ch in n.get("Checks", [])}
        checks = {cid: ch["Status"] for cid, ch in raw.items()}
        # Maintenance (`cronsul drain`, `consul maint`) is deliberate, not a fault: it makes the
        # node draining and not eligible, and only the other checks decide whether it is healthy.
        maintenance = maintenance_reason(raw, svc["ID"])
        report["nodes"].append({
            "node": svc["ID"].removeprefix("cronsul-"),
            "address": svc.get("Address"),
            "healthy": all(st == "passing" for cid, st in checks.items()
                           if not cid.startswith(MAINTENANCE_PREFIXES)),
            "draining": maintenance is not None,
            "maintenance": maintenance,
            "eligible": meta.get("eligible", "true") == "true" and maintenance is None,
            "config_hash": meta.get("config_hash"),
            "drift": meta.get("config_hash") != reference,
            "checks": checks,
        })
    # Nodes that ran here once and are not registered now: stopped (cleanly: "stopped"), or
    # gone without deregistering long enough for Consul to drop the service (24 h critical).
    # `consul kv delete <prefix>/nodes/<node>` forgets a decommissioned one.
    registered = {n["node"] for n in report["nodes"]}
    report["absent_nodes"] = []
    for e in known or []:
        body = _json(e.get("Value"))
        name = e["Key"].rsplit("/", 1)[-1]
        if name and name not in registered and isinstance(body, dict):
            report["absent_nodes"].append({
                "node": name, "address": body.get("address"), "since": body.get("at"),
                "stopped_cleanly": bool(body.get("stopped"))})
    try:
        report.update(_redis_view(cfg, redis_client))
    except redis.RedisError as exc:
        report["redis_error"] = redact(str(exc))[:200]
    return report


def _redis_view(cfg: Config, r: redis.Redis) -> dict[str, Any]:
    keys = Keys(cfg.redis.key_prefix)
    now_ms = time.time() * 1000
    queues = sorted(set(cfg.worker.queues) | {j.queue for j in cfg.jobs.values()})
    stats: dict[str, Any] = {}
    in_flight: dict[str, int] = {}
    for q in queues if cfg.queue.backend != "sqs" else []:  # SQS: see render()
        s = queue_stats(r, keys.stream(q), now_ms)
        stats[q] = {"depth": s.depth, "pending": s.pending,
                    "oldest_age_s": round(s.oldest_age_s, 1)}
        if s.pending:
            summary: Any = r.xpending(keys.stream(q), GROUP)
            for consumer in summary.get("consumers") or []:
                name = consumer["name"].decode() if isinstance(consumer["name"], bytes) \
                    else consumer["name"]
                in_flight[name] = in_flight.get(name, 0) + int(consumer["pending"])
    failures: list[dict[str, Any]] = []
    for job in cfg.jobs:
        ids: Any = r.zrevrange(keys.history(job), 0, RUNS_PER_JOB - 1)
        for run_id in ids:
            rec: Any = r.hmget(keys.run(run_id.decode()), "state", "finished_ms", "node",
                               "exit_code", "error", "signal", "timed_out")
            state = (rec[0] or b"").decode()
            # A run replaced by a newer one (overlap = replace) is the policy working, not a
            # failure to look into.
            if state in ("failed", "dead") and not (rec[4] or b"").startswith(b"stopped: replaced"):
                failures.append({
                    "run_id": run_id.decode(), "job": job, "state": state,
                    "finished": iso_utc(from_epoch_ms(int(rec[1]))) if rec[1] else None,
                    "node": (rec[2] or b"").decode(), "exit_code": (rec[3] or b"").decode(),
                    "error": (rec[4] or b"").decode()[:200],
                    "signal": (rec[5] or b"").decode(),
                    "timed_out": (rec[6] or b"").decode() in ("1", "True"),
                })
    failures.sort(key=lambda f: f["finished"] or "", reverse=True)
    return {"queues": stats, "in_flight": in_flight, "dead_letters": int(r.xlen(keys.dead)),
            "recent_failures": failures[:RECENT_FAILURES]}


def render(report: dict[str, Any]) -> str:
    out: list[str] = []
    leader = report["leader"]
    out.append(f"leader: {leader.get('node')} since {leader.get('since')} "
               f"(fence {leader.get('fence')})" if leader else "leader: none")
    out.append("nodes:")
    in_flight = report.get("in_flight", {})
    for n in report["nodes"]:
        flags = [
            "healthy" if n["healthy"] else "UNHEALTHY",
            *([f"draining ({n.get('maintenance') or 'maintenance'})"] if n["draining"] else []),
            *(["not eligible"] if not n["eligible"] else []),
            *(["CONFIG DIFFERS FROM THE LEADER'S"] if n["drift"] else []),
        ]
        out.append(f"  {n['node']:<20} {n['address'] or '':<16} "
                   f"running {in_flight.get(n['node'], 0):<4} {', '.join(flags)}")
    for n in report.get("absent_nodes") or []:
        how = "stopped" if n["stopped_cleanly"] else "not registered (last registered"
        out.append(f"  {n['node']:<20} {n['address'] or '':<16} NOT RUNNING: {how} "
                   f"{'at ' if n['stopped_cleanly'] else ''}{n['since'] or '?'}"
                   + ("" if n["stopped_cleanly"] else ")"))
    if "redis_error" in report:
        out.append(f"redis: UNREACHABLE ({report['redis_error']})")
    else:
        out.append("queues:" if report["queues"] else
                   "queues: on SQS; their depth and age are CloudWatch's "
                   "ApproximateNumberOfMessagesVisible and ApproximateAgeOfOldestMessage")
        for q, s in report["queues"].items():
            out.append(f"  {q:<20} depth {s['depth']:<6} in flight {s['pending']:<6} "
                       f"oldest {s['oldest_age_s']}s")
        out.append(f"dead letters: {report['dead_letters']}")
    if report["paused"]:
        out.append("paused jobs: " + ", ".join(
            f"{job} ({_reason(text)})" for job, text in sorted(report["paused"].items())))
    failures = report.get("recent_failures") or []
    if failures:
        out.append("recent failures:")
        for f in failures:
            how = ("timed out" if f.get("timed_out") else
                   f"signal {f['signal']}" if f.get("signal") else
                   f"exit {f['exit_code']}" if f["exit_code"] else "")
            out.append("  " + "  ".join(x for x in (
                f["finished"] or "-", f["run_id"], f"{f['state']} on {f['node'] or '-'}", how,
                f["error"]) if x))
    return "\n".join(out)


def _pause_value(raw: bytes | None) -> Any:
    text = (raw or b"").decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _reason(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("reason") or "no reason")
    return str(value) if value else "no reason"
