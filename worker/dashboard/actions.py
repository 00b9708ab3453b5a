"""The dashboard's actions. Each reuses the code behind the matching CLI command
(worker/opcmds.py, worker/inspect_cmds.py, worker/maintenance.py) and raises ``ActionError``
with an HTTP status and a message for the operator."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis

from scheduler.errors import ConfigError, ConnectionFailure, CronsulError, MessageError
from scheduler.runs import iso_utc
from worker.config import Config
from worker.consulapi import CALL_TIMEOUT_S, CONSUL_ERRORS, make_clients
from worker.inspect_cmds import RETRY, _check_entry_id, _retry_one
from worker.keys import Keys
from worker.maintenance import set_drain
from worker.opcmds import _consul_put, enqueue_manual, parse_params

# Pause reasons are shown on every page; keep them short.
REASON_MAX = 200


class ActionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _known_job(cfg: Config, job: str) -> None:
    if job not in cfg.jobs:
        raise ActionError(404, f"no job named {job!r} in this node's config")


def run_now(cfg: Config, r: redis.Redis, job: str, params: dict[str, str]) -> str:
    """Enqueue a manual run, as ``cronsul run JOB --param K=V``; returns its run id."""
    _known_job(cfg, job)
    try:
        values = parse_params(cfg, job, [f"{k}={v}" for k, v in params.items()])
    except ConfigError as exc:
        raise ActionError(400, str(exc)) from exc
    try:
        return enqueue_manual(cfg, r, job, values)
    except redis.RedisError as exc:
        raise ActionError(503, f"Redis: {str(exc)[:200]}") from exc


def pause(cfg: Config, job: str, reason: str, who: str) -> None:
    _known_job(cfg, job)
    value = json.dumps({"reason": reason[:REASON_MAX], "by": who,
                        "at": iso_utc(datetime.now(UTC))})
    try:
        _consul_put(cfg, f"{cfg.consul.prefix}/paused/{job}", value)
    except ConnectionFailure as exc:
        raise ActionError(503, str(exc)) from exc


def resume(cfg: Config, job: str) -> None:
    _known_job(cfg, job)
    try:
        make_clients(cfg.consul, CALL_TIMEOUT_S).call.kv.delete(
            f"{cfg.consul.prefix}/paused/{job}")
    except CONSUL_ERRORS as exc:
        raise ActionError(503, f"cannot reach Consul: {str(exc)[:200]}") from exc


def dlq_retry(cfg: Config, r: redis.Redis, entry_id: str) -> str:
    keys = Keys(cfg.redis.key_prefix)
    fields = _dead_letter(r, keys, entry_id)
    try:
        line = _retry_one(r, keys, cfg, r.register_script(RETRY), entry_id, fields)
    except MessageError as exc:
        raise ActionError(409, f"refused to retry dead letter {entry_id}: {exc}") from exc
    except redis.RedisError as exc:
        raise ActionError(503, f"Redis: {str(exc)[:200]}") from exc
    if line is None:
        raise ActionError(404, f"dead letter {entry_id} vanished (retried or purged meanwhile)")
    return line


def dlq_purge(cfg: Config, r: redis.Redis, entry_id: str) -> str:
    keys = Keys(cfg.redis.key_prefix)
    _dead_letter(r, keys, entry_id)
    if not r.xdel(keys.dead, entry_id):
        raise ActionError(404, f"dead letter {entry_id} vanished (retried or purged meanwhile)")
    return f"purged dead letter {entry_id}"


def _dead_letter(r: redis.Redis, keys: Keys, entry_id: str) -> dict[bytes, bytes]:
    try:
        _check_entry_id(entry_id)
    except ConfigError as exc:
        raise ActionError(404, str(exc)) from exc
    found: Any = r.xrange(keys.dead, entry_id, entry_id)
    if not found:
        raise ActionError(404, f"no dead letter {entry_id!r}")
    fields: dict[bytes, bytes] = found[0][1]
    return fields


def drain(cfg: Config, node: str, enable: bool, who: str, elsewhere: str | None) -> str:
    """Service maintenance through this node's Consul agent, as ``cronsul drain``: only this
    node's (Consul's maintenance API is per agent). ``elsewhere``: the other node's dashboard."""
    if node != cfg.agent.node:
        where = f" at {elsewhere}" if elsewhere else ""
        raise ActionError(409, f"{node} can only be drained from its own dashboard{where} "
                          "(or with cronsul drain on that host)")
    try:
        svc = set_drain(cfg, enable, f"dashboard: drained by {who}" if enable else None)
    except ConnectionFailure as exc:
        raise ActionError(503, str(exc)) from exc
    except CronsulError as exc:
        raise ActionError(409, str(exc)) from exc
    return f"{svc}: " + ("draining" if enable else "back in service")
