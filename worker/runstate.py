"""Run records, run leases and overlap locks in Redis: the state machine behind "no lost work".

States: queued -> running -> succeeded | failed | retrying | dead | skipped (retrying goes back
to running on the next attempt). Every transition is one Lua script, and the scripts that end a
delivery also ack it (XACK) in the same step, so a crash can never leave a run acked but
unrecorded, or recorded as finished but delivered again.

* ``begin``: terminal record -> ack, don't run (it finished; only the ack was lost). Lease held by
  another token -> leave it (alive elsewhere). Record ``running`` without a lease -> its node died:
  ``on_lost = "fail"`` records it failed, ``"retry"`` runs it again. Overlap lock held by another
  run -> ``skip`` records it skipped; ``queue``/``replace`` park it in the delayed set (at most one
  waiting run per lock; more are skipped), ``replace`` also asks the holder to stop.
* ``renew``: extends each lease (and overlap lock) still ours; reports lost leases and stop
  requests.
* ``finish``: only while the lease is ours: record the result, drop lease and lock
  (compare-and-delete), ack, and for a retry put the run in the delayed set; for a run that
  exhausted its retries, add a dead letter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.keys import GROUP, Keys

TERMINAL = ("succeeded", "failed", "dead", "skipped")

BEGIN = """
local run, lease, lock, waiting = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stream, delayed = KEYS[5], KEYS[6]
local token, node, lease_ms, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local job, sched, run_id, queue, ttl = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local overlap, on_lost, entry = ARGV[10], ARGV[11], ARGV[12]
local payload, stop_prefix = ARGV[13], ARGV[14]
local wait_ms = tonumber(ARGV[15])
local function ack() if entry ~= '' then redis.call('XACK', stream, ARGV[16], entry) end end
local function meta()
  redis.call('HSET', run, 'job', job, 'scheduled_ms', sched, 'run_id', run_id, 'queue', queue)
  if redis.call('TTL', run) < 0 then redis.call('EXPIRE', run, ttl) end
end
local st = redis.call('HGET', run, 'state')
if st == 'succeeded' or st == 'failed' or st == 'dead' or st == 'skipped' then
  ack(); return {'done', st}
end
local holder = redis.call('GET', lease)
if holder and holder ~= token then return {'busy', holder} end
if st == 'running' and not holder and on_lost == 'fail' then
  meta()
  redis.call('HSET', run, 'state', 'failed', 'finished_ms', now,
             'error', 'lost: the node running it stopped renewing its lease (on_lost = fail)')
  ack(); return {'lost', ''}
end
if overlap ~= 'allow' then
  local cur = redis.call('GET', lock)
  local mine = run_id .. ' '
  if cur and string.sub(cur, 1, #mine) ~= mine then
    local other = string.match(cur, '^(%S+)')
    if overlap == 'skip' then
      meta()
      redis.call('HSET', run, 'state', 'skipped', 'finished_ms', now,
                 'error', 'skipped: previous run ' .. other .. ' still running (overlap = skip)')
      ack(); return {'skipped', other}
    end
    local w = redis.call('GET', waiting)
    if w and w ~= run_id then
      meta()
      redis.call('HSET', run, 'state', 'skipped', 'finished_ms', now,
                 'error', 'skipped: run ' .. w .. ' is already waiting (overlap = '
                 .. overlap .. ')')
      ack(); return {'skipped', w}
    end
    redis.call('SET', waiting, run_id, 'PX', lease_ms)
    if overlap == 'replace' then redis.call('SET', stop_prefix .. other, run_id, 'PX', lease_ms) end
    meta()
    redis.call('HSET', run, 'state', 'queued', 'waiting_for', other)
    redis.call('ZADD', delayed, tonumber(now) + wait_ms, queue .. '|' .. payload)
    ack(); return {'wait', other}
  end
  redis.call('SET', lock, run_id .. ' ' .. token, 'PX', lease_ms)
  if redis.call('GET', waiting) == run_id then redis.call('DEL', waiting) end
end
redis.call('SET', lease, token, 'PX', lease_ms)
local attempt = redis.call('HINCRBY', run, 'attempt', 1)
meta()
redis.call('HSET', run, 'state', 'running', 'node', node, 'started_ms', now)
redis.call('HDEL', run, 'waiting_for')
return {'start', tostring(attempt)}
"""

# KEYS: per run (lease, lock or the lease key again when no lock, stop); ARGV[1] = lease ms,
# then per run: token, run id. Returns per run 1 renewed, 0 lost, 2 renewed but asked to stop.
RENEW = """
local out = {}
local n = #KEYS / 3
for i = 1, n do
  local lease, lock, stop = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local token, run_id = ARGV[2*i], ARGV[2*i+1]
  if redis.call('GET', lease) == token then
    redis.call('PEXPIRE', lease, ARGV[1])
    if lock ~= lease and redis.call('GET', lock) == run_id .. ' ' .. token then
      redis.call('PEXPIRE', lock, ARGV[1])
    end
    if redis.call('EXISTS', stop) == 1 then out[i] = 2 else out[i] = 1 end
  else
    out[i] = 0
  end
end
return out
"""

FINISH = """
local run, lease, lock, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local hist, delayed, dlq = KEYS[5], KEYS[6], KEYS[7]
local token, group, entry, state, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local run_id, retry_at, queue, payload = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
if redis.call('GET', lease) ~= token then return 0 end
local fields = cjson.decode(ARGV[6])
for k, v in pairs(fields) do redis.call('HSET', run, k, tostring(v)) end
redis.call('HSET', run, 'state', state, 'finished_ms', now)
redis.call('DEL', lease)
if lock ~= lease and redis.call('GET', lock) == run_id .. ' ' .. token then
  redis.call('DEL', lock)
end
if entry ~= '' then redis.call('XACK', stream, group, entry) end
if retry_at ~= '' then
  redis.call('ZADD', delayed, tonumber(retry_at), queue .. '|' .. payload)
  redis.call('HSET', run, 'retry_at_ms', retry_at)
end
if state == 'dead' then
  redis.call('XADD', dlq, 'MAXLEN', '~', ARGV[11], '*', 'reason', 'retries exhausted',
             'error', fields['error'] or '', 'queue', queue, 'entry_id', entry,
             'node', fields['node'] or '', 'payload', payload, 'run_id', run_id)
end
redis.call('ZADD', hist, now, run_id)
redis.call('ZREMRANGEBYRANK', hist, 0, -1001)
return 1
"""

# Delayed runs (retries, waiting overlap runs) due by now go to their queue stream: atomic, so
# any number of nodes may promote at once without duplicating a run.
PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  local sep = string.find(member, '|', 1, true)
  local queue = string.sub(member, 1, sep - 1)
  redis.call('XADD', ARGV[2] .. queue, '*', 'p', string.sub(member, sep + 1))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# The SQS backend's PROMOTE: due runs go to the outbox list that worker.outbox.OutboxDrainer sends
# to SQS. The item is tagged with its due time ("<queue>~<due ms>|<payload>") so that a FIFO
# queue, which deduplicates by run id for 5 minutes, does not drop a retry of a run sent earlier.
PROMOTE_OUTBOX = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0,
                       tonumber(ARGV[2]))
for i = 1, #due, 2 do
  local member, score = due[i], due[i + 1]
  local sep = string.find(member, '|', 1, true)
  redis.call('RPUSH', KEYS[2], string.sub(member, 1, sep - 1) .. '~' .. score
             .. string.sub(member, sep))
  redis.call('ZREM', KEYS[1], member)
end
return #due / 2
"""

# Dead letters kept; older ones are trimmed (approximately) so a poison flood cannot fill Redis.
DEAD_LETTER_MAX = 10_000
# A run waiting for an overlap lock is looked at again this often.
OVERLAP_WAIT_MS = 1000


@dataclass(frozen=True)
class BeginResult:
    verdict: str  # start | done | busy | lost | skipped | wait
    attempt: int = 0
    detail: str = ""


@dataclass(frozen=True)
class RunRef:
    """What begin needs to know about a run."""

    run_id: str
    job: str
    scheduled_ms: int
    queue: str
    payload: bytes
    entry_id: str = ""  # "" when the transport acks by itself (SQS)
    overlap: str = "allow"
    lock_name: str = ""
    on_lost: str = "retry"


class RunState:
    def __init__(self, client: redis.Redis, keys: Keys, node: str, record_ttl_s: int,
                 *, outbox: bool = False) -> None:
        self._r = client
        self._outbox = outbox  # SQS backend: promote delayed runs to the outbox, not streams
        self._keys = keys
        self._node = node
        self._ttl = record_ttl_s
        self._begin = client.register_script(BEGIN)
        self._renew = client.register_script(RENEW)
        self._finish = client.register_script(FINISH)
        self._promote = client.register_script(PROMOTE)
        self._promote_outbox = client.register_script(PROMOTE_OUTBOX)

    def _lock_key(self, ref: RunRef) -> str:
        return self._keys.lock(ref.lock_name) if ref.overlap != "allow" else self._keys.lease(
            ref.run_id)

    def begin(self, ref: RunRef, token: str, lease_ms: int, now_ms: int) -> BeginResult:
        k = self._keys
        lock = self._lock_key(ref)
        out = self._begin(
            keys=[k.run(ref.run_id), k.lease(ref.run_id), lock, k.waiting(ref.lock_name or "-"),
                  k.stream(ref.queue), k.delayed],
            args=[token, self._node, lease_ms, now_ms, ref.job, ref.scheduled_ms, ref.run_id,
                  ref.queue, self._ttl, ref.overlap, ref.on_lost, ref.entry_id, ref.payload,
                  k.stop(""), OVERLAP_WAIT_MS, GROUP],
        )
        verdict = _s(out[0])
        if verdict == "start":
            return BeginResult("start", attempt=int(out[1]))
        return BeginResult(verdict, detail=_s(out[1]))

    def renew(self, runs: Sequence[tuple[RunRef, str]], lease_ms: int) -> list[int]:
        """Extend each (run, token) lease still ours: 1 ok, 0 lost, 2 ok but asked to stop."""
        if not runs:
            return []
        keys: list[str] = []
        args: list[Any] = [lease_ms]
        for ref, token in runs:
            keys += [self._keys.lease(ref.run_id), self._lock_key(ref), self._keys.stop(ref.run_id)]
            args += [token, ref.run_id]
        return [int(x) for x in self._renew(keys=keys, args=args)]

    def finish(self, ref: RunRef, token: str, state: str, finished_ms: int,
               fields: Mapping[str, Any], retry_at_ms: int | None = None) -> bool:
        k = self._keys
        out = self._finish(
            keys=[k.run(ref.run_id), k.lease(ref.run_id), self._lock_key(ref), k.stream(ref.queue),
                  k.history(ref.job), k.delayed, k.dead],
            args=[token, GROUP, ref.entry_id, state, finished_ms,
                  json.dumps(dict(fields), separators=(",", ":")), ref.run_id,
                  "" if retry_at_ms is None else retry_at_ms, ref.queue, ref.payload,
                  DEAD_LETTER_MAX],
        )
        return bool(int(out))

    def promote(self, now_ms: int, limit: int = 500) -> int:
        if self._outbox:
            return int(self._promote_outbox(keys=[self._keys.delayed, self._keys.outbox],
                                            args=[now_ms, limit]))
        return int(self._promote(keys=[self._keys.delayed],
                                 args=[now_ms, self._keys.stream(""), limit]))

    def record(self, run_id: str) -> dict[str, str]:
        raw: Any = self._r.hgetall(self._keys.run(run_id))
        return {_s(k): _s(v) for k, v in raw.items()}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
