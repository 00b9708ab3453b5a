"""What the dashboard shows but nothing else keeps: leadership changes, each node's live state,
and an hour of queue depth samples. One small thread per agent writes them to Redis.

* ``<p>:dash:elections``: list, newest first, of JSON ``{"node","since","fence","at"}``, written
  by a node when it becomes leader; trimmed to ELECTIONS_KEPT.
* ``<p>:dash:node:<node>``: JSON ``{"node","url","role","eligible","draining","running","pid",
  "at"}``, rewritten every NODE_EVERY_S with a TTL of NODE_TTL_S (a dead node's entry expires).
* ``<p>:dash:queue:<queue>``: list of ``"<ms> <depth> <oldest age ms>"``, oldest first, sampled
  by the leader every SAMPLE_EVERY_S and trimmed to SAMPLES_KEPT (one hour).

A failure here is logged and retried; it never touches scheduling or execution.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
import structlog

from scheduler.runs import iso_utc
from worker.keys import Keys
from worker.metrics import queue_stats

# Leadership changes listed on the Cluster page.
ELECTIONS_KEPT = 50
# Each node republishes its state this often; the entry outlives a few missed rounds only.
NODE_EVERY_S = 2.0
NODE_TTL_S = 10
# Queue depth samples: every 10 s for an hour.
SAMPLE_EVERY_S = 10.0
SAMPLES_KEPT = 360
# The loop's period; also bounds how late an election is recorded.
LOOP_S = 0.5


@dataclass(frozen=True)
class DashKeys:
    prefix: str

    @property
    def elections(self) -> str:
        return f"{self.prefix}:dash:elections"

    def node(self, node: str) -> str:
        return f"{self.prefix}:dash:node:{node}"

    def samples(self, queue: str) -> str:
        return f"{self.prefix}:dash:queue:{queue}"


@dataclass(frozen=True)
class TermInfo:
    session: str
    since: datetime
    fence: int


@dataclass(frozen=True)
class NodeProbe:
    """This agent's live state, read on every round."""

    node: str
    url: str | None
    term: Callable[[], TermInfo | None]  # the current term while leading with a valid lease
    role: Callable[[], str]
    eligible: Callable[[], bool]
    draining: Callable[[], str | None]
    running: Callable[[], int]
    queues: Callable[[], Sequence[str]]  # queues to sample (only the leader samples)


class Recorder:
    def __init__(self, client: redis.Redis, prefix: str, probe: NodeProbe,
                 clock: Callable[[], float] = time.time) -> None:
        self._r = client
        self._keys = Keys(prefix)
        self._dk = DashKeys(prefix)
        self._probe = probe
        self._clock = clock
        self._recorded: TermInfo | None = None
        self._last_node = float("-inf")
        self._last_sample = float("-inf")
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="dashboard-recorder", daemon=True)
        self._log = structlog.get_logger("cronsul.dashboard").bind(node=probe.node)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(LOOP_S)

    def tick(self) -> None:
        now = self._clock()
        try:
            term = self._probe.term()
            if term is not None and term != self._recorded:
                self._election(term, now)
            self._recorded = term if term is not None else self._recorded
            if now - self._last_node >= NODE_EVERY_S:
                self._node(now)
            if term is not None and now - self._last_sample >= SAMPLE_EVERY_S:
                self._sample(now)
        except redis.RedisError as exc:
            if not self._failing:
                self._log.warning("dashboard_record_failed", error=str(exc)[:200])
            self._failing = True
            return
        self._failing = False

    def _election(self, term: TermInfo, now: float) -> None:
        entry = {"node": self._probe.node, "since": iso_utc(term.since), "fence": term.fence,
                 "at": _iso(now)}
        pipe = self._r.pipeline(transaction=True)
        pipe.lpush(self._dk.elections, json.dumps(entry, separators=(",", ":")))
        pipe.ltrim(self._dk.elections, 0, ELECTIONS_KEPT - 1)
        pipe.execute()
        self._recorded = term

    def _node(self, now: float) -> None:
        p = self._probe
        body = {"node": p.node, "url": p.url, "role": p.role(), "eligible": p.eligible(),
                "draining": p.draining(), "running": p.running(), "pid": os.getpid(),
                "at": _iso(now)}
        self._r.set(self._dk.node(p.node), json.dumps(body, separators=(",", ":")),
                    ex=NODE_TTL_S)
        self._last_node = now

    def _sample(self, now: float) -> None:
        now_ms = int(now * 1000)
        stats = [(q, queue_stats(self._r, self._keys.stream(q), now_ms))
                 for q in dict.fromkeys(self._probe.queues())]
        pipe = self._r.pipeline(transaction=False)
        for queue, s in stats:
            pipe.rpush(self._dk.samples(queue), f"{now_ms} {s.depth} {int(s.oldest_age_s * 1000)}")
            pipe.ltrim(self._dk.samples(queue), -SAMPLES_KEPT, -1)
        pipe.execute()
        self._last_sample = now


def _iso(epoch_s: float) -> str:
    return iso_utc(datetime.fromtimestamp(epoch_s, UTC))
