"""The leader's side of Redis: fenced, idempotent, atomic enqueue of due ticks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import redis

from scheduler.errors import FencedOff
from scheduler.ports import EnqueueResult, Fence, TickBatch
from scheduler.runs import epoch_ms, from_epoch_ms, iso_utc
from worker.keys import Keys

# One script call per scheduler pass: refuse a lower fence, raise the highest seen, claim each
# run id once (HSETNX on the run record), enqueue, advance cursors. Redis runs it atomically,
# so a zombie leader can neither interleave with nor overwrite its successor's writes.
APPLY = """
local e = tonumber(ARGV[1])
local i = tonumber(ARGV[2])
local he = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local hi = tonumber(redis.call('HGET', KEYS[1], 'index') or '0')
if e < he or (e == he and i < hi) then
  return {-1, he, hi}
end
if e ~= he or i ~= hi then
  redis.call('HSET', KEYS[1], 'epoch', e, 'index', i)
end
local ttl = tonumber(ARGV[3])
local now = ARGV[4]
local ops = cjson.decode(ARGV[5])
local enq, dup = 0, 0
for _, r in ipairs(ops.runs) do
  -- r = {run_key, stream, payload, job, scheduled_ms, run_id, queue}
  if redis.call('HSETNX', r[1], 'state', 'queued') == 1 then
    redis.call('HSET', r[1], 'job', r[4], 'scheduled_ms', r[5], 'run_id', r[6],
               'queue', r[7], 'enqueued_ms', now, 'payload', r[3])
    redis.call('EXPIRE', r[1], ttl)
    redis.call('XADD', r[2], '*', 'p', r[3])
    enq = enq + 1
  else
    dup = dup + 1
  end
end
for _, c in ipairs(ops.cursors) do
  local cur = tonumber(redis.call('GET', c[1]) or '-1')
  if tonumber(c[2]) > cur then
    redis.call('SET', c[1], c[2])
  end
end
return {enq, dup}
"""

# Raise the epoch after Consul's index went backwards (its state was lost or restored): only
# if nobody raised it since we looked, and writing our fence at once so older leaders are refused.
REBASE = """
local he = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if he ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'epoch', he + 1, 'index', ARGV[2])
return he + 1
"""

# Run records are the dedup claims too, so they must outlive any catch-up window by far.
RECORD_TTL = timedelta(days=7)


def run_payload(run_id: str, job: str, scheduled_at: datetime, params: Mapping[str, str]) -> str:
    """The versioned message format a worker accepts (see docs/architecture.md)."""
    return json.dumps(
        {"v": 1, "run_id": run_id, "job": job, "scheduled_at": iso_utc(scheduled_at),
         "params": dict(params)},
        separators=(",", ":"), ensure_ascii=False,
    )


class RedisSink:
    """Implements scheduler.ports.Sink and CursorStore on one Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys
        self._apply = client.register_script(APPLY)
        self._rebase = client.register_script(REBASE)

    def highest_fence(self) -> Fence:
        raw = self._r.hgetall(self._keys.fence)
        return Fence(int(raw.get(b"epoch", 0)), int(raw.get(b"index", 0)))

    def open_fence(self, index: int) -> Fence | None:
        """Our fence for a Consul index, or None when the index went backwards (rebase needed)."""
        highest = self.highest_fence()
        mine = Fence(highest.epoch, index)
        return mine if mine >= highest else None

    def rebase_fence(self, seen: Fence, index: int) -> Fence | None:
        result = int(self._rebase(keys=[self._keys.fence], args=[seen.epoch, index]))
        return None if result < 0 else Fence(result, index)

    def apply(self, batch: TickBatch, fence: Fence) -> EnqueueResult:
        k = self._keys
        runs = [
            [k.run(run.run_id), k.stream(queue),
             run_payload(run.run_id, run.job, run.scheduled_at, run.params),
             run.job, epoch_ms(run.scheduled_at), run.run_id, queue]
            for run, queue in batch.runs
        ]
        cursors = [[k.cursor(job), epoch_ms(when)] for job, when in batch.cursors.items()]
        ops = json.dumps({"runs": runs or {}, "cursors": cursors or {}}, separators=(",", ":"))
        seconds, micros = self._r.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000  # Redis's clock: one for all nodes
        out = self._apply(
            keys=[k.fence],
            args=[fence.epoch, fence.index, int(RECORD_TTL.total_seconds()), now_ms, ops],
        )
        if int(out[0]) < 0:
            raise FencedOff(
                f"enqueue refused: fence {fence.epoch}/{fence.index} is below the highest seen "
                f"{int(out[1])}/{int(out[2])}"
            )
        return EnqueueResult(enqueued=int(out[0]), deduplicated=int(out[1]))

    def load_cursors(self, jobs: Sequence[str]) -> Mapping[str, datetime | None]:
        if not jobs:
            return {}
        values = self._r.mget([self._keys.cursor(j) for j in jobs])
        return {
            job: (from_epoch_ms(int(v)) if v is not None else None)
            for job, v in zip(jobs, values, strict=True)
        }
