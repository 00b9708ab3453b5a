"""Run records, run leases and overlap locks in Redis: the state machine behind "no lost work".

States: queued -> running -> succeeded | failed | retrying | dead | skipped (retrying goes back
to running on the next attempt). Every transition is one Lua script, and the scripts that end a
delivery also ack it (XACK) in the same step, so a crash can never leave a run acked but
unrecorded, or recorded as finished but delivered again.

* ``begin``: terminal record -> ack, don't run (it finished; only the ack was lost). Lease held by
  another token -> leave it (alive elsewhere). Record ``running`` without a lease -> its node died:
  ``on_lost = "fail"`` records it failed, ``"retry"`` runs it again. Overlap lock held by another
  run -> ``skip`` records it skipped; ``queue``/``replace`` park it in the delayed set (at most one
  waiting run per lock; more are skipped), ``replace`` also asks the holder to stop. ``replace``
  keeps the newest run: a run older than the one holding or awaiting the lock is superseded
  (skipped), and a newer one takes the waiting place of an older. A run with an attempt behind
  it (a retry) is never skipped for the lock: it waits for it (or, superseded, stays failed).
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
from worker.messages import MAX_PAYLOAD_BYTES, payload_field

TERMINAL = ("succeeded", "failed", "dead", "skipped")
# The value `cronsul stop` writes to a run's stop key starts with this (then who and why).
OPERATOR_STOP = "operator:"
# A run id or job name longer than this in a dead-lettered message is not looked up (the
# longest a valid one can be is far shorter: see worker.messages.RUN_ID_TAIL).
MAX_ID_CHARS = 1024

# Run by BEGIN and FINISH around each run of a batch. Both scripts read a run's own keys before
# they write any of them, so the one error a run's keys can cause (WRONGTYPE: something else
# wrote its record, lease, lock or waiting key) comes before anything is written for it; that
# error is the run's result, and the other runs of the batch are claimed or recorded as usual
# (otherwise the whole batch would be retried, then left to lapse and run again elsewhere).
# Every other error fails the whole call, which the caller retries: out of memory, a read-only
# replica, a failed save (MISCONF), loading... Redis refuses those at the first write, before
# anything is written.
EACH = """
local function each(fn, ...)
  local res = {pcall(fn, ...)}
  if res[1] then return true, res[2], res[3] end
  local msg = type(res[2]) == 'table' and res[2].err or tostring(res[2])
  if string.sub(msg, 1, 9) ~= 'WRONGTYPE' then error({err = msg}) end
  return false, msg
end
"""

# BEGIN and FINISH take any number of runs in one call (the consumer batches the runs of one
# fetch and the results finished together), so a busy node pays one round trip per batch.
# BEGIN: shared ARGV[1..8] = node, lease ms, now ms, record ttl s, stop key prefix, overlap
# wait ms, consumer group, history entries kept per job; then per run 7 KEYS (record, lease,
# lock, waiting, stream, delayed, history) and 9 ARGV (token, job, scheduled ms, run id, queue,
# overlap, on_lost, entry id, payload). A run that ends here (skipped, or failed as lost) is
# listed in its job's history as FINISH lists the others.
# Returns per run two elements: verdict, detail (the attempt number for "start"; for "error",
# what is wrong with that run's keys).
BEGIN = EACH + """
local node, lease_ms, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local stop_prefix, wait_ms, group = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local hist_keep, trim = -1 - tonumber(ARGV[8]), {}
local function begin(run, lease, lock, waiting, stream, delayed, hist, a)
  local token, job, sched, run_id = ARGV[a], ARGV[a+1], ARGV[a+2], ARGV[a+3]
  local queue, overlap, on_lost, entry, payload = ARGV[a+4], ARGV[a+5], ARGV[a+6], ARGV[a+7],
                                                  ARGV[a+8]
  local function ack()  -- acked entries are deleted: the stream holds only live work
    if entry ~= '' then
      redis.call('XACK', stream, group, entry)
      redis.call('XDEL', stream, entry)
    end
  end
  local function meta()
    redis.call('HSET', run, 'job', job, 'scheduled_ms', sched, 'run_id', run_id, 'queue', queue)
    if redis.call('TTL', run) < 0 then redis.call('EXPIRE', run, ttl) end
  end
  local function ended()  -- best effort, as in FINISH: the record is what counts
    local added = redis.pcall('ZADD', hist, now, run_id)
    if type(added) ~= 'table' or not added.err then trim[hist] = true end
  end
  -- Reads first (see EACH): the lease, then the record.
  local holder = redis.call('GET', lease)
  if holder and holder ~= token then return 'busy', holder end
  local rec = redis.call('HMGET', run, 'state', 'attempt', 'dead_on_arrival')
  local st, tries = rec[1], rec[2]
  -- Dead-lettered on arrival by a node that could not run it: this copy may run here.
  if st == 'dead' and rec[3] then st = 'queued' end
  if tries and (not tonumber(tries) or tonumber(tries) % 1 ~= 0) then
    return 'error', 'record ' .. run .. ' has attempt = ' .. tries .. ', not a whole number'
  end
  if st == 'succeeded' or st == 'failed' or st == 'dead' or st == 'skipped' then
    ack(); return 'done', st
  end
  if st == 'running' and not holder and on_lost == 'fail' then
    meta()
    redis.call('HSET', run, 'state', 'failed', 'finished_ms', now,
               'error', 'lost: the node running it stopped renewing its lease (on_lost = fail)')
    ended(); ack(); return 'lost', ''
  end
  if overlap ~= 'allow' then
    local cur = redis.call('GET', lock)
    local w = redis.call('GET', waiting)
    local mine = run_id .. ' '
    -- An attempt of this run ran already (a retry, a run taken over, a `dlq retry`): it is
    -- never skipped for the lock (its failure would vanish as "skipped"); it waits for it.
    local retry = (tonumber(tries) or 0) > 0
    local base = string.sub(run, 1, #run - #run_id)  -- the record key of another run id
    local function compare(id)  -- run `id` scheduled after (1), before (-1) this one, or 0
      local t = tonumber(redis.call('HGET', base .. id, 'scheduled_ms'))
      if t == nil or t == tonumber(sched) then return 0 end
      if t > tonumber(sched) then return 1 end
      return -1
    end
    local function newer(id) return compare(id) == 1 end
    -- overlap = replace keeps the newest run: this one, older than the run holding or
    -- awaiting the lock, is superseded (a late catch-up tick, the retry of an older run).
    local function superseded(by, how)
      meta()
      if retry then  -- its last attempt failed and stays the record's result
        redis.call('HSET', run, 'state', 'failed', 'finished_ms', now, 'error',
                   'failed, not retried: the newer run ' .. by .. ' ' .. how
                   .. ' (overlap = replace)')
        ended(); ack(); return 'superseded', by
      end
      redis.call('HSET', run, 'state', 'skipped', 'finished_ms', now,
                 'error', 'skipped: the newer run ' .. by .. ' ' .. how .. ' (overlap = replace)')
      ended(); ack(); return 'skipped', by
    end
    if cur and string.sub(cur, 1, #mine) ~= mine then
      local other = string.match(cur, '^(%S+)')
      if overlap == 'replace' and newer(other) then return superseded(other, 'is running') end
      if overlap == 'skip' and not retry then
        meta()
        redis.call('HSET', run, 'state', 'skipped', 'finished_ms', now,
                   'error', 'skipped: previous run ' .. other .. ' still running (overlap = skip)')
        ended(); ack(); return 'skipped', other
      end
      local slot = not w or w == run_id
      if not slot and overlap == 'replace' then
        local order = compare(w)
        if order == 1 then return superseded(w, 'is waiting') end
        -- Strictly older: this run takes its place (it is superseded when it comes back).
        -- The same tick (a fan-out sharing one lock): the first to wait keeps the place,
        -- or the two would take it from each other and stop each other's runs in turn.
        slot = order == -1
      end
      if not slot and not retry then
        meta()
        redis.call('HSET', run, 'state', 'skipped', 'finished_ms', now,
                   'error', 'skipped: run ' .. w .. ' is already waiting (overlap = '
                   .. overlap .. ')')
        ended(); ack(); return 'skipped', w
      end
      if slot then redis.call('SET', waiting, run_id, 'PX', lease_ms) end
      if overlap == 'replace' then
        -- An operator's `cronsul stop` already there stays: its reason is what the record
        -- will say, not "replaced".
        local asked = redis.call('GET', stop_prefix .. other)
        if not asked or string.sub(asked, 1, 9) ~= 'operator:' then
          redis.call('SET', stop_prefix .. other, run_id, 'PX', lease_ms)
        end
      end
      meta()
      redis.call('HSET', run, 'state', 'queued', 'waiting_for', other)
      redis.call('ZADD', delayed, tonumber(now) + wait_ms, queue .. '|' .. payload)
      ack(); return 'wait', other
    end
    if overlap == 'replace' and w and w ~= run_id and newer(w) then
      return superseded(w, 'is waiting')
    end
    redis.call('SET', lock, run_id .. ' ' .. token, 'PX', lease_ms)
    if w == run_id then redis.call('DEL', waiting) end
  end
  redis.call('SET', lease, token, 'PX', lease_ms)
  local attempt = redis.call('HINCRBY', run, 'attempt', 1)
  redis.call('HSET', run, 'job', job, 'scheduled_ms', sched, 'run_id', run_id, 'queue', queue,
             'state', 'running', 'node', node, 'started_ms', now)
  if redis.call('TTL', run) < 0 then redis.call('EXPIRE', run, ttl) end
  redis.call('HDEL', run, 'waiting_for', 'dead_on_arrival')
  return 'start', tostring(attempt)
end
local out = {}
for i = 0, #KEYS / 7 - 1 do
  local k = 7 * i
  local ok, verdict, detail = each(begin, KEYS[k+1], KEYS[k+2], KEYS[k+3], KEYS[k+4],
                                   KEYS[k+5], KEYS[k+6], KEYS[k+7], 9 + 9 * i)
  if not ok then verdict, detail = 'error', verdict end
  out[2*i+1] = verdict
  out[2*i+2] = detail
end
for hist in pairs(trim) do redis.call('ZREMRANGEBYRANK', hist, 0, hist_keep) end
return out
"""

# KEYS: per run (lease, lock or the lease key again when no lock, stop); ARGV[1] = lease ms,
# then per run: token, run id. Returns per run 1 renewed, 0 lost, 2 renewed but asked to stop
# by a newer run (replace), 3 renewed but asked to stop by an operator (`cronsul stop`: the
# stop key's value starts with OPERATOR_STOP).
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
    local asked = redis.call('GET', stop)
    if not asked then out[i] = 1
    elseif string.sub(asked, 1, 9) == 'operator:' then out[i] = 3
    else out[i] = 2 end
  else
    out[i] = 0
  end
end
return out
"""

# KEYS[1] = record, KEYS[2] = stop key; ARGV[1] = value (OPERATOR_STOP + who and why), ARGV[2]
# = ttl ms. One step, so a run that ends between a check and the write is never left a stop
# request (nor reported "asked" when it had already finished). Returns the record's state, or
# false when there is no record; the stop key is written only for a running run.
REQUEST_STOP = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return state
"""

# FINISH: shared KEYS[1..3] = delayed set, dead-letter stream, last-success hash; ARGV[1..7] =
# consumer group, node, dead letters kept, history entries kept per job, record ttl s, late
# (1/0), length of the history keys' prefix (the job is the rest). Per run 5 KEYS (record,
# lease, lock, stream, history) and ARGV token, entry id, state, finished ms, run id, retry due
# ms or "", queue, payload, n, then n field/value pairs for the record. Returns per run 1
# recorded, 0 the lease was not ours (nothing written), or the Redis error that run's keys caused.
FINISH = EACH + """
local delayed, dlq, last_ok = KEYS[1], KEYS[2], KEYS[3]
local group, node, dead_max, hist_keep = ARGV[1], ARGV[2], ARGV[3], -1 - tonumber(ARGV[4])
local ttl, late, hist_pre = ARGV[5], ARGV[6] == '1', tonumber(ARGV[7])
local out, trim, succeeded = {}, {}, {}
local function finish(run, lease, lock, stream, hist, a, n, first)
  local token, entry, state, now = ARGV[a], ARGV[a+1], ARGV[a+2], ARGV[a+3]
  local run_id, retry_at, queue, payload = ARGV[a+4], ARGV[a+5], ARGV[a+6], ARGV[a+7]
  local attempt = ARGV[a+8]
  -- Reads first (see EACH): the lease and the lock; the record's HSET is the first write.
  local held = redis.call('GET', lease)
  if held ~= token then
    -- Late (Redis was unreachable until after the lease lapsed): the result still counts if
    -- nobody took the run over meanwhile: no lease at all, and the record still says this
    -- attempt runs on this node. A node that took it over holds a lease and counted the
    -- attempt up, so exactly one of the two wins.
    if not late or held then return 0 end
    local rec = redis.call('HMGET', run, 'state', 'node', 'attempt')
    if rec[1] ~= 'running' or rec[2] ~= node or rec[3] ~= attempt then return 0 end
  end
  do
    local lock_ours = lock ~= lease and redis.call('GET', lock) == run_id .. ' ' .. token
    local err, why = '', {}
    local hset = {'HSET', run, 'state', state, 'finished_ms', now}
    for j = first, first + 2 * n - 1, 2 do
      hset[#hset+1] = ARGV[j]
      hset[#hset+1] = ARGV[j+1]
      if ARGV[j] == 'error' then err = ARGV[j+1] end
      why[ARGV[j]] = ARGV[j+1]
    end
    if err == '' then  -- a dead letter says why: the last attempt's exit, signal or timeout
      if why['timed_out'] == 'True' or why['timed_out'] == '1' then err = 'timed out'
      elseif (why['signal'] or '') ~= '' then err = 'killed by signal ' .. why['signal']
      elseif (why['exit_code'] or '') ~= '' then err = 'exit code ' .. why['exit_code'] end
    end
    redis.call(unpack(hset))
    -- The record may have expired while the run ran (a retention shorter than the run): the
    -- HSET made it anew, and it must not stay for ever.
    if redis.call('TTL', run) < 0 then redis.call('EXPIRE', run, ttl) end
    redis.call('DEL', lease)
    if lock_ours then redis.call('DEL', lock) end
    if entry ~= '' then  -- acked and deleted (see BEGIN's ack)
      redis.call('XACK', stream, group, entry)
      redis.call('XDEL', stream, entry)
    end
    if retry_at ~= '' then
      redis.call('ZADD', delayed, tonumber(retry_at), queue .. '|' .. payload)
      redis.call('HSET', run, 'retry_at_ms', retry_at)
    end
    if state == 'dead' then
      redis.call('XADD', dlq, 'MAXLEN', '~', dead_max, '*', 'reason', 'retries exhausted',
                 'error', err, 'queue', queue, 'entry_id', entry, 'node', node,
                 'payload', payload, 'run_id', run_id)
    end
    -- The history index only lists runs (`cronsul history`): a broken one (something else
    -- wrote the key) must not fail a run whose record is written.
    local added = redis.pcall('ZADD', hist, now, run_id)
    if type(added) ~= 'table' or not added.err then trim[hist] = true end
    -- The job's last success (cronsul_job_last_success_timestamp_seconds: the "has not
    -- succeeded for too long" alert): noted here, written once per job per call below.
    if state == 'succeeded' then
      local job = string.sub(hist, hist_pre + 1)
      if not succeeded[job] or tonumber(now) > succeeded[job] then
        succeeded[job] = tonumber(now)
      end
    end
    return 1
  end
end
local a = 8
for i = 0, (#KEYS - 3) / 5 - 1 do
  local k = 3 + 5 * i
  local n = tonumber(ARGV[a+9])
  local _, result = each(finish, KEYS[k+1], KEYS[k+2], KEYS[k+3], KEYS[k+4], KEYS[k+5], a, n,
                         a + 10)
  out[i+1] = result  -- 1, 0, or the error
  a = a + 10 + 2 * n
end
for hist in pairs(trim) do redis.call('ZREMRANGEBYRANK', hist, 0, hist_keep) end
-- Only forward (a batch may record an older finish after a newer one), and never failing
-- the runs already recorded (pcall: something else may have written the key).
for job, ms in pairs(succeeded) do
  local cur = redis.pcall('HGET', last_ok, job)
  if type(cur) ~= 'table' and (not cur or ms > (tonumber(cur) or 0)) then
    redis.pcall('HSET', last_ok, job, ms)
  end
end
return out
"""

# A message dead-lettered on arrival (unknown job, bad params, ...) whose record was made for it
# (state queued: the scheduler's enqueue, `cronsul run`; or retrying: a promoted retry): the
# record says dead, with why, and the run is listed in its job's history, so `run --wait`,
# `history` and `logs` do not show it waiting forever. Only when the record holds this very
# payload: a forged message naming another run's id cannot end that run. The reasons depend on
# the node (its config may be behind): so the record is marked `dead_on_arrival`, and BEGIN
# still starts another copy of the message that reaches a node able to run it (an SQS standard
# queue's duplicate, a `dlq retry` racing this). KEYS: record, history; ARGV: payload, error
# (it starts with the reason, as the dead letter's does), now ms, node, history entries kept.
# Returns 1 if the record was ended.
DEAD_ON_ARRIVAL = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'payload', 'run_id')
if (rec[1] ~= 'queued' and rec[1] ~= 'retrying') or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'dead', 'finished_ms', ARGV[3], 'node', ARGV[4],
           'error', ARGV[2], 'dead_on_arrival', '1')
local added = redis.pcall('ZADD', KEYS[2], ARGV[3], rec[3])
if type(added) ~= 'table' or not added.err then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -1 - tonumber(ARGV[5]))
end
return 1
"""

# A run handed back by a node whose config cannot run it (worker.consumer.HAND_BACK_WINDOW_S):
# queued again in the delayed set, and its record, if it holds this very payload and waits,
# says which node could not run it and why (`cronsul run --wait` and `logs` show it). KEYS:
# delayed set, record; ARGV: member ("<queue>|<payload>"), due ms, payload, note.
HAND_BACK = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local rec = redis.call('HMGET', KEYS[2], 'state', 'payload')
if (rec[1] == 'queued' or rec[1] == 'retrying') and rec[2] == ARGV[3] then
  redis.call('HSET', KEYS[2], 'handed_back', ARGV[4])
end
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

# A finished attempt that another follows (its verdict is retrying; or a dead run an operator
# retries: inspect_cmds.RETRY) is kept in its record under these fields, so the next attempt's
# result does not replace its output (`cronsul logs RUN_ID --attempt N`): "attempt:<n>" holds a
# JSON object of ATTEMPT_META, "output:<n>" its output tail (at most the job's output_limit).
# The record's own fields are always the latest attempt's; kept attempts expire with it.
ATTEMPT_FIELD = "attempt:"
OUTPUT_FIELD = "output:"
ATTEMPT_META = ("state", "node", "started_ms", "finished_ms", "exit_code", "signal",
                "timed_out", "duration_ms", "output_bytes", "error")
# Dead letters kept; older ones are trimmed (approximately) so a poison flood cannot fill Redis.
DEAD_LETTER_MAX = 10_000
# A run waiting for an overlap lock is looked at again this often.
OVERLAP_WAIT_MS = 1000
# Run ids kept in each job's history index (`cronsul history`); the records expire on their own.
HISTORY_PER_JOB = 1000


def kept_attempt(attempt: int, fields: Mapping[str, str]) -> dict[str, str]:
    """The fields that keep attempt ``attempt`` (its record ``fields``) in the record after
    the next attempt ran (see ATTEMPT_FIELD)."""
    meta = {name: fields.get(name, "") for name in ATTEMPT_META}
    return {f"{ATTEMPT_FIELD}{attempt}": json.dumps(meta, separators=(",", ":")),
            f"{OUTPUT_FIELD}{attempt}": fields.get("output", "")}


@dataclass(frozen=True)
class BeginResult:
    verdict: str  # start | done | busy | lost | skipped | wait | error (detail: the error)
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


@dataclass(frozen=True)
class Finished:
    """What finish records for one run."""

    ref: RunRef
    token: str
    state: str
    finished_ms: int
    fields: Mapping[str, Any]
    retry_at_ms: int | None = None
    attempt: int = 0  # the attempt it ran as: checked by a late finish (see FINISH)


@dataclass(frozen=True)
class FinishResult:
    """How finish went for one run: recorded, or not (its lease was not ours, or ``error``)."""

    recorded: bool
    # The error this run's own keys caused (WRONGTYPE); nothing was written for it, since the
    # script reads a run's keys before it writes any.
    error: str = ""

    def __bool__(self) -> bool:
        return self.recorded


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
        self._hand_back = client.register_script(HAND_BACK)
        self._promote_outbox = client.register_script(PROMOTE_OUTBOX)
        self._dead_on_arrival = client.register_script(DEAD_ON_ARRIVAL)
        self._request_stop = client.register_script(REQUEST_STOP)

    @property
    def client(self) -> redis.Redis:
        """The Redis client (live output is written through it: worker/live.py)."""
        return self._r

    @property
    def keys(self) -> Keys:
        return self._keys

    def _lock_key(self, ref: RunRef) -> str:
        return self._keys.lock(ref.lock_name) if ref.overlap != "allow" else self._keys.lease(
            ref.run_id)

    def begin(self, ref: RunRef, token: str, lease_ms: int, now_ms: int) -> BeginResult:
        return self.begin_many([(ref, token)], lease_ms, now_ms)[0]

    def begin_many(self, runs: Sequence[tuple[RunRef, str]], lease_ms: int,
                   now_ms: int) -> list[BeginResult]:
        """Claim each (run, token) in one script call; one BeginResult per run, in order."""
        if not runs:
            return []
        k = self._keys
        keys: list[str] = []
        args: list[Any] = [self._node, lease_ms, now_ms, self._ttl, k.stop(""), OVERLAP_WAIT_MS,
                           GROUP, HISTORY_PER_JOB]
        for ref, token in runs:
            keys += [k.run(ref.run_id), k.lease(ref.run_id), self._lock_key(ref),
                     k.waiting(ref.lock_name or "-"), k.stream(ref.queue), k.delayed,
                     k.history(ref.job)]
            args += [token, ref.job, ref.scheduled_ms, ref.run_id, ref.queue, ref.overlap,
                     ref.on_lost, ref.entry_id, ref.payload]
        out = self._begin(keys=keys, args=args)
        results: list[BeginResult] = []
        for i in range(0, len(out), 2):
            verdict = _s(out[i])
            if verdict == "start":
                results.append(BeginResult("start", attempt=int(out[i + 1])))
            else:
                results.append(BeginResult(verdict, detail=_s(out[i + 1])))
        return results

    def request_stop(self, run_id: str, why: str, ttl_ms: int) -> str | None:
        """An operator asks the node running ``run_id`` to stop it (its next lease renewal
        sees it). The run's state, or None when there is no record; only a running run is
        asked."""
        state: Any = self._request_stop(keys=[self._keys.run(run_id), self._keys.stop(run_id)],
                                        args=[OPERATOR_STOP + why, ttl_ms])
        return None if state is None else _s(state)

    def stop_reason(self, run_id: str) -> str:
        """Why an operator asked a run to stop (what follows OPERATOR_STOP), or ""."""
        value: Any = self._r.get(self._keys.stop(run_id))
        text = _s(value) if value is not None else ""
        return text[len(OPERATOR_STOP):] if text.startswith(OPERATOR_STOP) else ""

    def renew(self, runs: Sequence[tuple[RunRef, str]], lease_ms: int) -> list[int]:
        """Extend each (run, token) lease still ours: 1 ok, 0 lost, 2 ok but asked to stop by
        a newer run, 3 ok but asked to stop by an operator."""
        if not runs:
            return []
        keys: list[str] = []
        args: list[Any] = [lease_ms]
        for ref, token in runs:
            keys += [self._keys.lease(ref.run_id), self._lock_key(ref), self._keys.stop(ref.run_id)]
            args += [token, ref.run_id]
        return [int(x) for x in self._renew(keys=keys, args=args)]

    def finish(self, ref: RunRef, token: str, state: str, finished_ms: int,
               fields: Mapping[str, Any], retry_at_ms: int | None = None) -> FinishResult:
        return self.finish_many([Finished(ref, token, state, finished_ms, fields,
                                          retry_at_ms)])[0]

    def finish_many(self, runs: Sequence[Finished], *, late: bool = False
                    ) -> list[FinishResult]:
        """Record each result in one script call (only where the lease is still ours: not
        recorded for a run whose lease was lost, nothing written for it); in order. An error
        caused by one run's keys is that run's result; a server error raises. ``late``: Redis
        was unreachable past the leases; a result whose lease lapsed is recorded all the
        same if nobody took its run over (see FINISH)."""
        if not runs:
            return []
        k = self._keys
        keys: list[str] = [k.delayed, k.dead, k.last_success]
        args: list[Any] = [GROUP, self._node, DEAD_LETTER_MAX, HISTORY_PER_JOB, self._ttl,
                           1 if late else 0, len(k.history(""))]
        for f in runs:
            ref = f.ref
            keys += [k.run(ref.run_id), k.lease(ref.run_id), self._lock_key(ref),
                     k.stream(ref.queue), k.history(ref.job)]
            args += [f.token, ref.entry_id, f.state, f.finished_ms, ref.run_id,
                     "" if f.retry_at_ms is None else f.retry_at_ms, ref.queue, ref.payload,
                     f.attempt, len(f.fields)]
            for name, value in f.fields.items():
                args += [name, str(value)]
        return [FinishResult(False, _s(x)) if isinstance(x, bytes | str)
                else FinishResult(bool(int(x))) for x in self._finish(keys=keys, args=args)]

    def dead_on_arrival(self, payload: bytes | None, error: str, now_ms: int) -> bool:
        """After a message was dead-lettered without running: end the record made for it in
        state queued or retrying (see DEAD_ON_ARRIVAL). False when there is none to end."""
        if payload is None or len(payload) > MAX_PAYLOAD_BYTES:  # no record holds such a one
            return False
        run_id, job = payload_field(payload, "run_id"), payload_field(payload, "job")
        if not (run_id and job and len(run_id) <= MAX_ID_CHARS and len(job) <= MAX_ID_CHARS):
            return False
        return bool(self._dead_on_arrival(
            keys=[self._keys.run(run_id), self._keys.history(job)],
            args=[payload, error[:4096], now_ms, self._node, HISTORY_PER_JOB]))

    def hand_back(self, queue: str, payload: bytes, run_id: str, due_ms: int,
                  note: str) -> None:
        """Queue ``payload`` on ``queue`` again at ``due_ms`` (the delayed set, promoted by any
        node), for a run this node cannot run and another may; ``note`` (why) goes to its
        record while it waits."""
        self._hand_back(keys=[self._keys.delayed, self._keys.run(run_id)],
                        args=[queue.encode() + b"|" + payload, due_ms, payload, note])

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
