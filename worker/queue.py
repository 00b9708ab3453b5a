"""The Redis Streams transport: fetch in priority order, ack, dead-letter, reclaim.

Delivery is at least once (a consumer group; entries stay pending until acked). What makes that
safe is the run state machine in :mod:`worker.runstate`; this module only moves entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.keys import GROUP, Keys
from worker.messages import payload_field

# Dead letters kept; older ones are trimmed (approximately) so a poison flood cannot fill Redis.
DEAD_LETTER_MAX = 10_000


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this node."""

    queue: str
    entry_id: str
    payload: bytes | None
    deliveries: int = 1


class RedisQueue:
    """The Redis Streams transport (see worker.transport.Transport)."""

    # The run-state scripts XACK in the same step that records the run.
    acks_with_record = True

    def __init__(self, client: redis.Redis, keys: Keys, consumer: str) -> None:
        self._r = client
        self._keys = keys
        self._consumer = consumer

    def ensure_groups(self, queues: Sequence[str]) -> None:
        for q in queues:
            try:
                self._r.xgroup_create(self._keys.stream(q), GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def fetch(self, queues: Sequence[str], free: int, block_ms: int,
              per_queue: Mapping[str, int] | None = None) -> list[Delivery]:
        """Up to ``free`` entries in strict priority order: a queue is read only when every
        queue before it had nothing. ``per_queue`` caps what each queue may hand out now (its
        own concurrency limit). Blocks, on every open queue at once, only when all were empty."""
        def room(q: str) -> int:
            return min(free, per_queue.get(q, free)) if per_queue else free

        try:
            for q in queues:
                if room(q) > 0:
                    got = self._read({self._keys.stream(q): ">"}, room(q), None)
                    if got:
                        return got
            open_queues = [q for q in queues if room(q) > 0]
            if not open_queues:
                return []
            return self._read({self._keys.stream(q): ">" for q in open_queues}, 1, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream vanished (Redis restarted without persistence): recreate and go on.
            self.ensure_groups(queues)
            return []

    def _read(self, streams: dict[Any, Any], count: int, block_ms: int | None) -> list[Delivery]:
        reply = self._r.xreadgroup(GROUP, self._consumer, streams, count=count, block=block_ms)
        return self._deliveries(reply)

    def _deliveries(self, reply: Any) -> list[Delivery]:
        out: list[Delivery] = []
        for stream, entries in reply or []:
            queue = _queue_of(self._keys, stream)
            for entry_id, fields in entries:
                out.append(Delivery(queue, _s(entry_id), (fields or {}).get(b"p")))
        return out

    def ack(self, delivery: Delivery) -> None:
        """Ack and delete the entry: XACK alone leaves it in the stream for ever, and a stream
        of every run ever queued grows without bound (a per-second job fanned out to 50
        parameter sets adds 4.3 million entries a day)."""
        stream = self._keys.stream(delivery.queue)
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(stream, GROUP, delivery.entry_id)
        pipe.xdel(stream, delivery.entry_id)
        pipe.execute()

    def settle(self, delivery: Delivery) -> None:
        self.ack(delivery)

    def settle_many(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self.ack(d)

    def extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        """Nothing to do: a stream entry stays pending until acked; the run lease (renewed by
        the heartbeat) is what keeps other nodes from reclaiming it."""

    def dead_letter(self, delivery: Delivery, reason: str, error: str) -> None:
        """Move an entry that cannot be run to the dead-letter stream, with why, and ack it."""
        pipe = self._r.pipeline(transaction=True)
        pipe.xadd(
            self._keys.dead,
            {"reason": reason, "error": error[:4096], "queue": delivery.queue,
             "entry_id": delivery.entry_id, "node": self._consumer,
             "payload": (delivery.payload or b"")[:65536]},
            maxlen=DEAD_LETTER_MAX, approximate=True,
        )
        pipe.xack(self._keys.stream(delivery.queue), GROUP, delivery.entry_id)
        pipe.xdel(self._keys.stream(delivery.queue), delivery.entry_id)
        pipe.execute()

    def reclaim(self, queues: Sequence[str], min_idle_ms: int, count: int) -> list[Delivery]:
        """Take over entries whose consumer stopped acking and whose run lease has lapsed:
        at most ``count`` in all (the run slots free), the rest stay for the next round."""
        out: list[Delivery] = []
        for q in queues:
            stream = self._keys.stream(q)
            try:
                pending = self._r.xpending_range(stream, GROUP, min="-", max="+", count=count,
                                                 idle=min_idle_ms)
            except redis.ResponseError:
                continue
            for item in pending:
                if len(out) >= count:
                    return out
                out.extend(self._reclaim_one(q, stream, item, min_idle_ms))
        return out

    def _reclaim_one(self, queue: str, stream: str, item: Any, min_idle_ms: int) -> list[Delivery]:
        entry_id = _s(item["message_id"])
        entries: Any = self._r.xrange(stream, entry_id, entry_id)
        payload = entries[0][1].get(b"p") if entries else None
        run_id = payload_field(payload, "run_id")
        if run_id is not None and self._r.exists(self._keys.lease(run_id)):
            return []  # alive on some node: its lease is being renewed
        claimed: Any = self._r.xclaim(stream, GROUP, self._consumer, min_idle_ms, [entry_id])
        return [
            Delivery(queue, _s(cid), (fields or {}).get(b"p"),
                     int(item.get("times_delivered", 1)) + 1)
            for cid, fields in claimed or []
        ]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _queue_of(keys: Keys, stream: bytes | str) -> str:
    return _s(stream)[len(keys.stream("")):]


