"""The leader's side of Redis: fenced, idempotent, atomic enqueue of due ticks."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import redis

from scheduler.errors import ClockAhead, FencedOff
from scheduler.ports import EnqueueResult, Fence, TickBatch
from scheduler.runs import epoch_ms, from_epoch_ms, iso_utc
from worker.keys import Keys

# A scheduler pass is a few calls of this script: the runs in chunks of RUNS_PER_CALL, then the
# cursors. Each call refuses a lower fence and raises the highest seen; claims each run id once
# (HSETNX on the run record) and only then fills the record and enqueues it. Redis runs each call
# atomically, so a zombie leader can neither interleave with nor overwrite its successor's
# writes. Cursors move only after every run of the pass is in: a pass cut short (crash, fence
# refusal) is done again by the next leader from the old cursors, and the claims make the runs
# that were already in duplicates, not second runs.
#
# KEYS: the fence hash, (the SQS variant: the outbox list,) the delayed set, always last.
# ARGV: epoch, index, record ttl (s), run key prefix, stream key prefix, n runs, then per run
# run_id, job, scheduled_ms, queue, payload, not-before ms (0: none; a later one than Redis's
# clock puts the run in the delayed set, which any node promotes when due, instead of the
# stream: a fan-out's jitter); then n cursors, then per cursor key, epoch ms.
# A leader's clock may run this far ahead of Redis's before its passes are refused: NTP keeps
# hosts within milliseconds of each other; this leaves room for a sloppy clock, and catches a
# step (a VM restored from a snapshot, a bad time source). A failure drill stepped a leader
# 400 s ahead for 3 s: five minutes of ticks were logged missed, then none ran for 5 minutes.
CLOCK_AHEAD_MAX_MS = 2000
APPLY = """
local e = tonumber(ARGV[1])
local i = tonumber(ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'epoch', 'index')
local he = tonumber(f[1] or '0')
local hi = tonumber(f[2] or '0')
if e < he or (e == he and i < hi) then
  return {-1, he, hi}
end
local ttl, rpre, qpre = ARGV[3], ARGV[4], ARGV[5]
-- Redis's clock, one for all nodes (writes after TIME are fine: scripts replicate their
-- effects, the default since Redis 5 and the only mode since 7)
local t = redis.call('TIME')
local now = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
local last = 6 + 6 * tonumber(ARGV[6])
local delayed = KEYS[#KEYS]
-- A leader whose clock runs ahead of Redis's would enqueue ticks early and move the cursors
-- into the future: refuse (nothing written; the ticks wait, they are not lost).
local newest = 0
for j = 9, last, 6 do newest = math.max(newest, tonumber(ARGV[j])) end
for j = last + 3, last + 1 + 2 * tonumber(ARGV[last + 1]), 2 do
  newest = math.max(newest, tonumber(ARGV[j]))
end
if newest > tonumber(now) + AHEAD_MS then return {-2, now, newest} end
if e ~= he or i ~= hi then
  redis.call('HSET', KEYS[1], 'epoch', e, 'index', i)
end
local enq, dup = 0, 0
for j = 7, last, 6 do
  local run_id, queue, payload = ARGV[j], ARGV[j + 3], ARGV[j + 4]
  local key = rpre .. run_id
  if redis.call('HSETNX', key, 'state', 'queued') == 1 then
    redis.call('HSET', key, 'job', ARGV[j + 1], 'scheduled_ms', ARGV[j + 2], 'run_id', run_id,
               'queue', queue, 'enqueued_ms', now, 'payload', payload)
    redis.call('EXPIRE', key, ttl)
    if tonumber(ARGV[j + 5]) > tonumber(now) then
      redis.call('HSET', key, 'not_before_ms', ARGV[j + 5])
      redis.call('ZADD', delayed, ARGV[j + 5], queue .. '|' .. payload)
    else
      redis.call('XADD', qpre .. queue, '*', 'p', payload)
    end
    enq = enq + 1
  else
    dup = dup + 1
  end
end
-- Cursors only move forward: read them with MGET, write those that advance with MSET, in
-- slices (Lua's unpack has a stack limit of a few thousand values).
local stop = last + 1 + 2 * tonumber(ARGV[last + 1])
for s = last + 2, stop, 1000 do
  local keys, want = {}, {}
  for j = s, math.min(s + 998, stop - 1), 2 do
    keys[#keys + 1] = ARGV[j]
    want[#want + 1] = ARGV[j + 1]
  end
  local cur = redis.call('MGET', unpack(keys))
  local set = {}
  for x = 1, #keys do
    if not cur[x] or tonumber(want[x]) > tonumber(cur[x]) then
      set[#set + 1] = keys[x]
      set[#set + 1] = want[x]
    end
  end
  if #set > 0 then redis.call('MSET', unpack(set)) end
end
return {enq, dup}
""".replace("AHEAD_MS", str(CLOCK_AHEAD_MAX_MS))

# Raise the epoch after Consul's index went backwards (its state was lost or restored): only
# if nobody raised it since we looked, and writing our fence at once so older leaders are refused.
REBASE = """
local he = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if he ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'epoch', he + 1, 'index', ARGV[2])
return he + 1
"""

# When a leader first found Consul's index below the highest fence (Redis' clock, ms): set once
# per highest fence, so every later leader waits out the same settle period, not a fresh one.
REGRESSION_SEEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('GET', KEYS[1])
if not first then
  redis.call('SET', KEYS[1], now, 'PX', ARGV[1])
  first = now
end
return now - tonumber(first)
"""
# How long that first sighting is kept: far longer than any settle period.
REGRESSION_KEEP = timedelta(hours=1)

# Run records live for [worker] history_retention (Config.record_ttl); this is the default, for
# callers without a config. They are the dedup claims too, so they outlive any catch-up window.
RECORD_TTL = timedelta(days=7)


# Run ids and job names are built from this alphabet (scheduler.runs.JOB_NAME, "@", "#", the
# run id's digits and hex, "manual-"), so they go into JSON strings as they are.
_JSON_PLAIN = re.compile(r"[A-Za-z0-9_.@#-]*")


def run_payload(run_id: str, job: str, scheduled_at: datetime, params: Mapping[str, str],
                iso: str | None = None) -> str:
    """The versioned message format a worker accepts (see docs/architecture.md).

    Byte for byte ``json.dumps({"v": 1, "run_id", "job", "scheduled_at", "params"},
    separators=(",", ":"), ensure_ascii=False)``, formatted directly when the run id and job
    need no escaping (always, for names cronsul accepts). ``iso`` may pass
    ``iso_utc(scheduled_at)`` when the caller already has it."""
    when = iso if iso is not None else iso_utc(scheduled_at)
    if _JSON_PLAIN.fullmatch(run_id) and _JSON_PLAIN.fullmatch(job):
        body = json.dumps(dict(params), separators=(",", ":"), ensure_ascii=False) \
            if params else "{}"
        return (f'{{"v":1,"run_id":"{run_id}","job":"{job}","scheduled_at":"{when}",'
                f'"params":{body}}}')
    return json.dumps(
        {"v": 1, "run_id": run_id, "job": job, "scheduled_at": when, "params": dict(params)},
        separators=(",", ":"), ensure_ascii=False,
    )


# Runs per APPLY call: a pass of 1,000 runs becomes visible to consumers in four steps instead
# of all at the end, for one more round trip per step.
RUNS_PER_CALL = 250

Arg = str | int


@dataclass(frozen=True)
class Encoded:
    """A TickBatch as APPLY calls: each call's ARGV after the fence (RedisSink.prepare)."""

    owner: tuple[type, str]  # the sink class and key prefix it was encoded for
    calls: tuple[list[Arg], ...]


class RedisSink:
    """Implements scheduler.ports.Sink and CursorStore on one Redis."""

    SCRIPT = APPLY

    def __init__(self, client: redis.Redis, keys: Keys,
                 record_ttl: timedelta = RECORD_TTL) -> None:
        self._r = client
        self._keys = keys
        self._record_ttl_s = int(record_ttl.total_seconds())
        self._apply = client.register_script(self.SCRIPT)
        self._rebase = client.register_script(REBASE)
        self._regression_seen = client.register_script(REGRESSION_SEEN)
        self._script_keys = [keys.fence, keys.delayed]
        self._owner = (type(self), keys.prefix)
        if keys.run("x") != keys.run("") + "x" or keys.stream("x") != keys.stream("") + "x":
            raise ValueError("APPLY builds run and stream keys as prefix + name")

    def highest_fence(self) -> Fence:
        raw = self._r.hgetall(self._keys.fence)
        return Fence(int(raw.get(b"epoch", 0)), int(raw.get(b"index", 0)))

    def open_fence(self, index: int) -> Fence | None:
        """Our fence for a Consul index, or None when the index went backwards (rebase needed)."""
        highest = self.highest_fence()
        mine = Fence(highest.epoch, index)
        return mine if mine >= highest else None

    def regression_seen(self, highest: Fence) -> float:
        """Seconds since a leader first found Consul's index below ``highest`` (0.0 for the
        first one, which records the moment). Consul lost or restored its state at or before
        that moment, so every leader from before it lost its lease at most the settle period
        after it: later leaders wait out only what remains of it."""
        ms = self._regression_seen(
            keys=[f"{self._keys.fence}:regressed:{highest.epoch}:{highest.index}"],
            args=[int(REGRESSION_KEEP.total_seconds() * 1000)])
        return max(0.0, int(ms) / 1000)

    def rebase_fence(self, seen: Fence, index: int) -> Fence | None:
        result = int(self._rebase(keys=[self._keys.fence], args=[seen.epoch, index]))
        return None if result < 0 else Fence(result, index)

    def prepare(self, batch: TickBatch) -> TickBatch:
        return replace(batch, encoded=self._encode(batch))

    def apply(self, batch: TickBatch, fence: Fence) -> EnqueueResult:
        encoded = batch.encoded
        if not isinstance(encoded, Encoded) or encoded.owner != self._owner:
            encoded = self._encode(batch)
        enq = dup = 0
        for args in encoded.calls:
            out = self._apply(keys=self._script_keys, args=[fence.epoch, fence.index, *args])
            if int(out[0]) == -2:
                raise ClockAhead(
                    f"this node's clock is {(int(out[2]) - int(out[1])) / 1000:.1f}s ahead of "
                    "Redis's: nothing enqueued until it agrees (the ticks wait, none is lost; "
                    "check NTP on this host)")
            if int(out[0]) < 0:
                raise FencedOff(
                    f"enqueue refused: fence {fence.epoch}/{fence.index} is below the highest "
                    f"seen {int(out[1])}/{int(out[2])}"
                )
            enq += int(out[0])
            dup += int(out[1])
        return EnqueueResult(enqueued=enq, deduplicated=dup)

    def _encode(self, batch: TickBatch) -> Encoded:
        k = self._keys
        head: list[Arg] = [self._record_ttl_s, k.run(""), k.stream("")]
        times: dict[datetime, tuple[int, str]] = {}  # a pass's runs share a few tick times
        calls: list[list[Arg]] = []
        args: list[Arg] = []
        for n, (run, queue) in enumerate(batch.runs, 1):
            when = times.get(run.scheduled_at)
            if when is None:
                when = times[run.scheduled_at] = (epoch_ms(run.scheduled_at),
                                                  iso_utc(run.scheduled_at))
            args += (run.run_id, run.job, when[0], queue,
                     run_payload(run.run_id, run.job, run.scheduled_at, run.params, when[1]),
                     epoch_ms(run.not_before) if run.not_before is not None else 0)
            if n % RUNS_PER_CALL == 0 or n == len(batch.runs):
                calls.append([*head, len(args) // 6, *args, 0])
                args = []
        if batch.cursors:
            cursors: list[Arg] = [len(batch.cursors)]
            for job, when_ in batch.cursors.items():
                cursors += (k.cursor(job), epoch_ms(when_))
            calls.append([*head, 0, *cursors])
        return Encoded(self._owner, tuple(calls))

    def load_schedules(self, jobs: Sequence[str]) -> Mapping[str, str | None]:
        if not jobs:
            return {}
        values: Any = self._r.hmget(self._keys.schedules, list(jobs))
        return {job: (v.decode() if isinstance(v, bytes) else v)
                for job, v in zip(jobs, values, strict=True)}

    def save_schedules(self, schedules: Mapping[str, str]) -> None:
        if schedules:
            mapping: dict[Any, Any] = dict(schedules)
            self._r.hset(self._keys.schedules, mapping=mapping)

    def load_cursors(self, jobs: Sequence[str]) -> Mapping[str, datetime | None]:
        if not jobs:
            return {}
        values = self._r.mget([self._keys.cursor(j) for j in jobs])
        return {
            job: (from_epoch_ms(int(v)) if v is not None else None)
            for job, v in zip(jobs, values, strict=True)
        }
