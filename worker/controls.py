"""Operating schedules through Consul: paused jobs (watched) and the published schedule.

* ``<prefix>/paused/<job>``: present = paused. Written by ``cronsul pause`` or by an operator
  with ``consul kv put cronsul/paused/<job> "reason"``; any value is accepted.
* ``<prefix>/schedule``: the leader's effective schedule (JSON), so operators and
  ``cronsul status`` can see what the leader runs and which nodes' configs differ.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import structlog

from scheduler.clock import Clock
from scheduler.runs import iso_utc
from scheduler.ticker import ScheduledJob
from worker.consulapi import CONSUL_ERRORS, ConsulClients

# Blocking-read wait for the paused prefix; bounded by the blocking client's timeout.
PAUSE_WAIT = "4s"
# Pause after a Consul error before watching again.
ERROR_BACKOFF_S = 1.0
# The published schedule's "next" times go stale; refresh them this often while leading.
PUBLISH_EVERY_S = 30.0


class PauseWatcher:
    """Keeps ``paused`` (job -> reason) current with a blocking query on the prefix."""

    def __init__(self, clients: ConsulClients, prefix: str) -> None:
        self._b = clients.blocking
        self._prefix = f"{prefix}/paused/"
        self.paused: Mapping[str, str] = {}
        self.ready = threading.Event()  # set once the first answer arrived
        self._log = structlog.get_logger("cronsul.paused")

    def run(self, stop: threading.Event) -> None:
        index: int | None = None
        while not stop.is_set():
            try:
                new_index, entries = self._b.kv.get(self._prefix, recurse=True, index=index,
                                                    wait=PAUSE_WAIT)
            except CONSUL_ERRORS as exc:
                self._log.warning("pause_watch_failed", error=str(exc)[:200])
                stop.wait(ERROR_BACKOFF_S)
                continue
            new_index = int(new_index)
            # A smaller index means Consul's state was restored: start over (blocking rules).
            index = new_index if index is None or new_index >= index else None
            paused = {
                e["Key"][len(self._prefix):]: (e.get("Value") or b"").decode(errors="replace")
                for e in entries or [] if e["Key"] != self._prefix
            }
            if paused != self.paused:
                self._log.info("paused_jobs", jobs=sorted(paused))
            self.paused = paused
            self.ready.set()


def schedule_document(jobs: Mapping[str, ScheduledJob], node: str, since: datetime,
                      config_hash: str, paused: Mapping[str, str], now: datetime) -> str:
    body: dict[str, Any] = {
        "leader": node, "since": iso_utc(since), "config_hash": config_hash,
        "published_at": iso_utc(now), "jobs": {},
    }
    for name, job in sorted(jobs.items()):
        nxt = job.schedule.next_fire(now)
        body["jobs"][name] = {
            "schedule": job.schedule.expression, "timezone": job.schedule.timezone,
            "next": iso_utc(nxt) if nxt else None, "queue": job.queue,
            "params": len(job.params), "paused": name in paused,
        }
    return json.dumps(body, separators=(",", ":"))


class SchedulePublisher:
    """While this node leads, keeps ``<prefix>/schedule`` current."""

    def __init__(self, clients: ConsulClients, prefix: str, clock: Clock,
                 document: Callable[[], str | None]) -> None:
        self._c = clients.call
        self._key = f"{prefix}/schedule"
        self._clock = clock
        self._document = document  # None when not leading
        self.wake = threading.Event()
        self._log = structlog.get_logger("cronsul.schedule")

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            doc = self._document()
            if doc is not None:
                try:
                    self._c.kv.put(self._key, doc)
                except CONSUL_ERRORS as exc:
                    self._log.warning("schedule_publish_failed", error=str(exc)[:200])
            self.wake.wait(PUBLISH_EVERY_S)
            self.wake.clear()
