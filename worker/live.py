"""Live output: what runs that have been going a while printed, published for
``cronsul logs --follow``.

A run's output stays in its :class:`~worker.executor.OutputTail` on the reactor thread, and its
record gets the tail when it ends, as before. Once a second this publisher (a thread of its
own) asks the reactor, in one call, for what each run that started at least ``LIVE_AFTER_S``
ago printed since the last time, and writes it with one Redis pipeline: one ``XADD`` per run
with new output to ``<p>:live:<run_id>:<attempt>`` (a capped stream whose entries carry the
offset ``o`` of their bytes ``d`` in the attempt's output), and a ``PEXPIRE`` per stream.
Only runs somebody follows are published: ``cronsul logs --follow`` keeps
``<p>:live-want:<run_id>`` alive (``LIVE_WANT_MS``) while it watches, and the publisher looks
those keys up (one MGET) before it reads anything (a review measured 262 MB of Redis in 40 s
with 100 chatty runs published for nobody). Runs that finish within a second never reach Redis
here, the reactor never waits on Redis, and a busy node pays one MGET a second, whatever it
runs. A stream whose run ended (or moved
off this node) expires ``LIVE_LINGER_MS`` later; one whose node died expires ``LIVE_TTL_MS``
after its last write.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from scheduler.clock import Clock
from worker.keys import Keys
from worker.reactor import Reactor

# Output is published this often: one Redis pipeline per period for all of a node's runs.
LIVE_EVERY_S = 1.0
# Only runs that have been going at least this long are published: the many short runs of a
# busy node (thousands a second) pay nothing for live output.
LIVE_AFTER_S = 1.0
# At most this much of a run's output per entry (the newest): a job printing faster than this
# a second shows gaps live (the follower says how many bytes); its record keeps the tail.
LIVE_CHUNK_MAX = 64 * 1024
# Entries kept per stream (exact MAXLEN: one XADD a second per run makes it cheap): with
# LIVE_CHUNK_MAX it bounds a run's live output in Redis to 2 MiB, and a follower that starts
# late sees the last 30 or more seconds of it.
LIVE_ENTRIES = 32
# A running run's stream lives this long past its last write (renewed every period while the
# run is on this node): if the node dies, nothing is left behind for longer.
LIVE_TTL_MS = 30_000
# After its run ended, a stream expires this much later: a follower reads the end from the
# run's record, so this only leaves it time to drain what it was reading.
LIVE_LINGER_MS = 10_000
# A follower refreshes its want key at least once per read (every FOLLOW_BLOCK_MS, 1 s); the
# key outlives a few missed refreshes, and publishing stops this long after the follower left.
LIVE_WANT_MS = 5_000
# All of a node's live output per period, whatever the number of followed runs: Redis' memory
# is the cluster's, and a page of followers must not fill it.
LIVE_BUDGET_BYTES = 4 * 1024 * 1024
# How long the publisher waits for the reactor's answer before it skips a period.
REACTOR_WAIT_S = 2.0


@dataclass(frozen=True)
class LiveRun:
    """A run that may publish: ``read(offset, cap)`` runs on the reactor thread and returns
    its output after ``offset`` (offset, bytes), or None once the run has ended."""

    run_id: str
    attempt: int
    limit: int  # the job's output_limit: nothing is published for a job that keeps none
    read: Callable[[int, int], tuple[int, bytes] | None]


class LivePublisher:
    """Publishes live output once a second (:meth:`run` on its own thread)."""

    def __init__(self, client: redis.Redis, keys: Keys, clock: Clock, reactor: Reactor,
                 source: Callable[[float], Sequence[LiveRun]], log: Any = None) -> None:
        """``source(began_before)``: the runs started (monotonic) no later than that."""
        self._r = client
        self._keys = keys
        self._clock = clock
        self._reactor = reactor
        self._source = source
        self._log = log or structlog.get_logger("cronsul.live")
        self._sent: dict[str, int] = {}  # stream key -> bytes published (publisher thread)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(LIVE_EVERY_S):
            try:
                self.publish_once()
            except (redis.RedisError, TimeoutError, RuntimeError) as exc:
                # Not advanced: the next period sends it (or says what was left out).
                self._log.warning("live_output_failed", error=str(exc)[:200])
            except Exception:  # a bug here must not stop live output for good
                self._log.exception("live_output_crashed")

    def publish_once(self) -> int:
        """One period: read the new output of every run old enough (one reactor call) and
        write it (one pipeline). The number of entries written."""
        runs = [r for r in self._source(self._clock.monotonic() - LIVE_AFTER_S) if r.limit > 0]
        if runs:
            wanted: Any = self._r.mget([self._keys.live_want(r.run_id) for r in runs])
            runs = [r for r, want in zip(runs, wanted, strict=True) if want is not None]
        share = LIVE_BUDGET_BYTES // max(1, len(runs))
        cap = {id(r): min(r.limit, LIVE_CHUNK_MAX, share) for r in runs}
        keys = {id(r): self._keys.live(r.run_id, r.attempt) for r in runs}
        sent = dict(self._sent)

        def read() -> list[tuple[LiveRun, tuple[int, bytes] | None]]:
            return [(r, r.read(sent.get(keys[id(r)], 0), cap[id(r)])) for r in runs]

        chunks = self._reactor.call(read, REACTOR_WAIT_S) if runs else []
        pipe = self._r.pipeline(transaction=False)
        written = 0
        live: set[str] = set()
        for r, got in chunks:
            key = keys[id(r)]
            if got is None:  # ended meanwhile: lingers below if it published
                continue
            live.add(key)
            offset, data = got
            if data:
                pipe.xadd(key, {"o": offset, "d": data}, maxlen=LIVE_ENTRIES,
                          approximate=False)
                sent[key] = offset + len(data)
                written += 1
            if key in sent:
                pipe.pexpire(key, LIVE_TTL_MS)
        for key in [k for k in sent if k not in live]:
            pipe.pexpire(key, LIVE_LINGER_MS)
            del sent[key]
        if len(pipe):
            pipe.execute()
        self._sent = sent
        return written
