"""The consumer side of the Redis Streams queue: fetch, claim, renew, finish, reclaim, dead-letter.

Delivery is at least once (a consumer group; entries stay pending until acked). It is made safe
by the run record state machine and the run lease, both changed only inside Lua scripts:

* ``begin``  refuses a run whose record is terminal (it finished; only the ack was lost) and a
  run whose lease another token holds (it is alive elsewhere); otherwise it takes the lease.
* ``finish`` writes the result, drops the lease and acks in one step, and only if the lease is
  still ours: a node that lost its lease (frozen, partitioned) can never overwrite or ack the
  run that another node took over.
* ``reclaim`` takes over entries idle longer than the visibility timeout whose lease is gone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.keys import GROUP, Keys
from worker.sink import RECORD_TTL

TERMINAL = ("succeeded", "failed", "dead")

BEGIN = """
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'succeeded' or st == 'failed' or st == 'dead' then return {'done', st} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'busy', holder} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'node', ARGV[2], 'started_ms', ARGV[4],
           'job', ARGV[5], 'scheduled_ms', ARGV[6], 'run_id', ARGV[7], 'queue', ARGV[8])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[9]) end
return {'start', tostring(attempt)}
"""

RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

FINISH = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local fields = cjson.decode(ARGV[6])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, tostring(v)) end
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'finished_ms', ARGV[5])
redis.call('DEL', KEYS[2])
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[7])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -1001)
return 1
"""

# Dead letters kept; older ones are trimmed (approximately) so a poison flood cannot fill Redis.
DEAD_LETTER_MAX = 10_000


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this node."""

    queue: str
    entry_id: str
    payload: bytes | None
    deliveries: int = 1


@dataclass(frozen=True)
class BeginResult:
    verdict: str  # "start" | "done" | "busy"
    attempt: int = 0
    detail: str = ""


class RedisQueue:
    def __init__(self, client: redis.Redis, keys: Keys, consumer: str) -> None:
        self._r = client
        self._keys = keys
        self._consumer = consumer
        self._begin = client.register_script(BEGIN)
        self._renew = client.register_script(RENEW)
        self._finish = client.register_script(FINISH)

    def ensure_groups(self, queues: Sequence[str]) -> None:
        for q in queues:
            try:
                self._r.xgroup_create(self._keys.stream(q), GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def fetch(self, queues: Sequence[str], count: int, block_ms: int) -> list[Delivery]:
        streams: dict[Any, Any] = {self._keys.stream(q): ">" for q in queues}
        try:
            reply = self._r.xreadgroup(GROUP, self._consumer, streams, count=count, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream vanished (Redis restarted without persistence): recreate and go on.
            self.ensure_groups(queues)
            return []
        return self._deliveries(reply)

    def _deliveries(self, reply: Any) -> list[Delivery]:
        out: list[Delivery] = []
        for stream, entries in reply or []:
            queue = _queue_of(self._keys, stream)
            for entry_id, fields in entries:
                out.append(Delivery(queue, _s(entry_id), (fields or {}).get(b"p")))
        return out

    def begin(self, run_id: str, token: str, lease_ms: int, now_ms: int, job: str,
              scheduled_ms: int, queue: str) -> BeginResult:
        out = self._begin(
            keys=[self._keys.run(run_id), self._keys.lease(run_id)],
            args=[token, self._consumer, lease_ms, now_ms, job, scheduled_ms, run_id, queue,
                  int(RECORD_TTL.total_seconds())],
        )
        verdict = _s(out[0])
        if verdict == "start":
            return BeginResult("start", attempt=int(out[1]))
        return BeginResult(verdict, detail=_s(out[1]))

    def renew(self, leases: Sequence[tuple[str, str]], lease_ms: int) -> list[bool]:
        """Extend each (run_id, token) lease still ours; False where it was lost."""
        if not leases:
            return []
        out = self._renew(
            keys=[self._keys.lease(run_id) for run_id, _ in leases],
            args=[lease_ms, *[token for _, token in leases]],
        )
        return [bool(int(x)) for x in out]

    def finish(self, delivery: Delivery, run_id: str, job: str, token: str, state: str,
               finished_ms: int, fields: Mapping[str, Any]) -> bool:
        out = self._finish(
            keys=[self._keys.run(run_id), self._keys.lease(run_id),
                  self._keys.stream(delivery.queue), self._keys.history(job)],
            args=[token, GROUP, delivery.entry_id, state, finished_ms,
                  json.dumps(dict(fields), separators=(",", ":")), run_id],
        )
        return bool(int(out))

    def ack(self, delivery: Delivery) -> None:
        self._r.xack(self._keys.stream(delivery.queue), GROUP, delivery.entry_id)

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
        pipe.execute()

    def reclaim(self, queues: Sequence[str], min_idle_ms: int, count: int) -> list[Delivery]:
        """Take over entries whose consumer stopped acking and whose run lease has lapsed."""
        out: list[Delivery] = []
        for q in queues:
            stream = self._keys.stream(q)
            try:
                pending = self._r.xpending_range(stream, GROUP, min="-", max="+", count=count,
                                                 idle=min_idle_ms)
            except redis.ResponseError:
                continue
            for item in pending:
                out.extend(self._reclaim_one(q, stream, item, min_idle_ms))
        return out

    def _reclaim_one(self, queue: str, stream: str, item: Any, min_idle_ms: int) -> list[Delivery]:
        entry_id = _s(item["message_id"])
        entries: Any = self._r.xrange(stream, entry_id, entry_id)
        payload = entries[0][1].get(b"p") if entries else None
        run_id = _run_id_of(payload)
        if run_id is not None and self._r.exists(self._keys.lease(run_id)):
            return []  # alive on some node: its lease is being renewed
        claimed: Any = self._r.xclaim(stream, GROUP, self._consumer, min_idle_ms, [entry_id])
        return [
            Delivery(queue, _s(cid), (fields or {}).get(b"p"),
                     int(item.get("times_delivered", 1)) + 1)
            for cid, fields in claimed or []
        ]

    def record(self, run_id: str) -> dict[str, str]:
        raw = self._r.hgetall(self._keys.run(run_id))
        return {_s(k): _s(v) for k, v in raw.items()}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _queue_of(keys: Keys, stream: bytes | str) -> str:
    return _s(stream)[len(keys.stream("")):]


def _run_id_of(payload: bytes | None) -> str | None:
    if not payload:
        return None
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    run_id = value.get("run_id") if isinstance(value, dict) else None
    return run_id if isinstance(run_id, str) else None
