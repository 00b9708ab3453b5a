"""The SQS backend's enqueue path: a Redis outbox between the fenced claim and SQS.

The leader's pass must stay atomic, fenced steps (fence check, claim of each run id, cursor
advance after the last run), and a Redis script cannot call SQS. So :class:`OutboxSink` runs
worker.sink's APPLY with its XADD replaced by an RPUSH of ``<queue>|<payload>`` onto
``<prefix>:outbox``; any node's :class:`OutboxDrainer` then sends the list's head to SQS and
removes what was sent.

A crash between the send and the removal sends those runs again. That is safe: a FIFO queue drops
the copy (MessageDeduplicationId = run id, for 5 minutes), and on a standard queue the run
record decides: ``begin`` answers a finished run "done" (the copy is deleted unrun) and a live
one "busy". Delayed runs (retries, waiting overlap runs) reach the outbox through
``RunState(outbox=True).promote``, tagged ``<queue>~<due ms>|<payload>`` so that a retry is not
taken for a duplicate of its first send.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
import structlog

from scheduler.errors import QueueError
from worker.config import Config
from worker.keys import Keys
from worker.queue import DEAD_LETTER_MAX
from worker.sink import APPLY, RECORD_TTL, RedisSink
from worker.sqs import (
    ERROR_PAUSE_S,
    MAX_BATCH,
    QUEUE_FAILURES,
    SQS_ERRORS,
    QueueDirectory,
    SqsTransport,
    sqs_client,
)

_XADD = "redis.call('XADD', qpre .. queue, '*', 'p', payload)"
_RPUSH = "redis.call('RPUSH', KEYS[2], queue .. '|' .. payload)"


def _outbox_apply() -> str:
    # Derived rather than copied, so the fence and claim logic has one source; refuse to load if
    # worker.sink's script no longer has the line this replaces.
    if APPLY.count(_XADD) != 1:
        raise QueueError("worker.sink.APPLY changed: the SQS outbox variant cannot find its XADD")
    return APPLY.replace(_XADD, _RPUSH)


OUTBOX_APPLY = _outbox_apply()

# Remove sent items: LREM of the exact value, first occurrence from the head, so two drainers
# that both sent an item (a lock that expired mid-pass) can never remove one nobody sent.
REMOVE_SENT = """
for _, item in ipairs(ARGV) do redis.call('LREM', KEYS[1], 1, item) end
return #ARGV
"""
# Compare-and-delete of the drain lock.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Compare-and-extend of the drain lock (ARGV: token, ms): 1 while it is still ours.
HOLD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Outbox items looked at per pass.
DRAIN_ITEMS = 100
# An idle drainer checks the outbox this often: it bounds the enqueue-to-SQS delay, for one
# LRANGE per node per interval.
DRAIN_IDLE_S = 0.1
# The drain lock keeps nodes from sending the same head twice. It is extended before each
# SendMessageBatch and a pass stops when it is no longer ours, so it only has to outlive one
# call; short, because a holder that dies (kill -9, a crash) or freezes stalls every node's
# enqueues until it lapses (a 60 s lock made each such death a minute without new runs). If it
# lapses during a call, another node may send a copy (safe: see docs/sqs.md).
DRAIN_LOCK_MS = 5_000
# SendMessageBatch accepts at most 256 KiB in total (SQS's long-standing limit; kept even where
# 1 MiB is accepted, so that older endpoints and localstack work too).
BATCH_BYTES = 256 * 1024
# MessageDeduplicationId is at most 128 characters; longer run ids are hashed.
DEDUP_ID_MAX = 128


class OutboxSink(RedisSink):
    """scheduler.ports.Sink for the SQS backend: RedisSink's fenced, idempotent pass (same calls,
    same chunks), with the runs appended to the outbox instead of a stream."""

    SCRIPT = OUTBOX_APPLY

    def __init__(self, client: redis.Redis, keys: Keys,
                 record_ttl: timedelta = RECORD_TTL) -> None:
        super().__init__(client, keys, record_ttl)
        self._script_keys = [keys.fence, keys.outbox, keys.delayed]


@dataclass(frozen=True)
class _Item:
    raw: bytes  # the list value, for the exact-value removal
    queue: str
    tag: str  # "" (first send) or the due time of a promoted delayed run
    payload: bytes


class OutboxDrainer:
    """Sends the outbox to SQS. Every node runs one; a lock lets one node at a time send."""

    def __init__(self, client: Any, directory: QueueDirectory, redis_client: redis.Redis,
                 keys: Keys, node: str) -> None:
        self._client = client
        self._dir = directory
        self._r = redis_client
        self._keys = keys
        self._node = node
        self._remove = redis_client.register_script(REMOVE_SENT)
        self._release = redis_client.register_script(RELEASE)
        self._hold = redis_client.register_script(HOLD)
        self._token = ""
        self._lock_lost = False  # this pass's lock was taken over: send nothing more
        self._trouble = False  # the last pass could not reach SQS: pause before the next
        self._log = structlog.get_logger("cronsul.outbox").bind(node=node)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                sent = self.drain_once()
            except redis.RedisError as exc:
                self._log.warning("redis_error", error=str(exc)[:200])
                stop.wait(0.5)
                continue
            if sent == 0:
                stop.wait(ERROR_PAUSE_S if self._trouble else DRAIN_IDLE_S)

    def drain_once(self) -> int:
        """One pass: returns how many items left the outbox (sent, or dead-lettered)."""
        self._trouble = False
        if not self._r.exists(self._keys.outbox):
            return 0
        token = self._token = uuid.uuid4().hex
        self._lock_lost = False
        if not self._r.set(self._keys.outbox_lock, token, nx=True, px=DRAIN_LOCK_MS):
            return 0  # another node is sending
        try:
            raw: Any = self._r.lrange(self._keys.outbox, 0, DRAIN_ITEMS - 1)
            items = [_parse(v) for v in raw]
            done: list[bytes] = []
            for item in items:
                if not item.payload:  # never written by cronsul; must not block the outbox
                    self._dead_letter(item, "malformed", "outbox item without a payload")
                    done.append(item.raw)
            items = [i for i in items if i.payload]
            for queue in dict.fromkeys(i.queue for i in items):
                done += self._send(queue, [i for i in items if i.queue == queue])
            if done:
                self.remove(done)
            return len(done)
        finally:
            self._release(keys=[self._keys.outbox_lock], args=[token])

    def remove(self, values: Sequence[bytes]) -> None:
        """Drop sent items from the outbox (separate, so tests can crash right before it)."""
        self._remove(keys=[self._keys.outbox], args=list(values))

    def _send(self, queue: str, items: list[_Item]) -> list[bytes]:
        try:
            sqs = self._dir.get(queue)
        except QUEUE_FAILURES as exc:
            self._log.warning("outbox_queue_unavailable", queue=queue, error=str(exc)[:300])
            self._trouble = True
            return []
        done: list[bytes] = []
        batch: list[_Item] = []
        for item in items:
            if self._lock_lost:  # mid-pass: leave the rest to the lock's new holder
                break
            if len(item.payload) > BATCH_BYTES:
                self._dead_letter(item, "oversized", f"{len(item.payload)} bytes > {BATCH_BYTES}")
                done.append(item.raw)
                continue
            if len(batch) == MAX_BATCH or sum(len(i.payload) for i in batch) + len(
                    item.payload) > BATCH_BYTES:
                done += self._send_batch(sqs.url, sqs.fifo, batch)
                batch = []
            batch.append(item)
        if batch and not self._lock_lost:
            done += self._send_batch(sqs.url, sqs.fifo, batch)
        return done

    def _send_batch(self, url: str, fifo: bool, batch: list[_Item]) -> list[bytes]:
        if not self._hold(keys=[self._keys.outbox_lock], args=[self._token, DRAIN_LOCK_MS]):
            self._trouble = self._lock_lost = True  # it lapsed (slow or frozen): stop here
            return []
        entries = []
        for i, item in enumerate(batch):
            entry: dict[str, Any] = {"Id": str(i),
                                     "MessageBody": item.payload.decode("utf-8", "replace")}
            if fifo:
                run_id, job = _run_of(item.payload)
                entry["MessageGroupId"] = job
                entry["MessageDeduplicationId"] = dedup_id(run_id, item.tag)
            entries.append(entry)
        try:
            reply = self._client.send_message_batch(QueueUrl=url, Entries=entries)
        except SQS_ERRORS as exc:
            self._log.warning("outbox_send_failed", url=url, error=str(exc)[:300])
            self._trouble = True
            return []  # stays in the outbox; the next pass sends it
        done = [batch[int(ok["Id"])].raw for ok in reply.get("Successful", [])]
        for failed in reply.get("Failed", []):
            item = batch[int(failed["Id"])]
            if failed.get("SenderFault"):  # SQS will never take it: do not block the outbox
                self._dead_letter(item, "refused by SQS",
                                  f"{failed.get('Code')}: {failed.get('Message')}")
                done.append(item.raw)
            else:
                self._log.warning("outbox_send_retrying", url=url, code=failed.get("Code"))
                self._trouble = True
        return done

    def _dead_letter(self, item: _Item, reason: str, error: str) -> None:
        self._log.error("outbox_dead_lettered", queue=item.queue, reason=reason, error=error)
        self._r.xadd(
            self._keys.dead,
            {"reason": reason, "error": error[:4096], "queue": item.queue, "entry_id": "",
             "node": self._node, "payload": item.payload[:65536]},
            maxlen=DEAD_LETTER_MAX, approximate=True,
        )


def _parse(value: bytes) -> _Item:
    head, _, payload = value.partition(b"|")
    queue, _, tag = head.decode().partition("~")
    return _Item(value, queue, tag, payload)


def _run_of(payload: bytes) -> tuple[str, str]:
    """(run id, job) of a payload cronsul wrote itself; odd ones still get a stable identity."""
    try:
        body = json.loads(payload)
        return str(body["run_id"]), str(body["job"])
    except (ValueError, KeyError, TypeError):
        return hashlib.sha256(payload).hexdigest(), "unknown"


def dedup_id(run_id: str, tag: str) -> str:
    """MessageDeduplicationId: the run id (a retry adds its due time), hashed when too long."""
    text = f"{run_id}~{tag}" if tag else run_id
    return text if len(text) <= DEDUP_ID_MAX else hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SqsBackend:
    """What the agent swaps in when ``[queue] backend = "sqs"``."""

    transport: SqsTransport
    sink: OutboxSink
    drainer: OutboxDrainer

    @classmethod
    def build(cls, cfg: Config, redis_client: redis.Redis, keys: Keys) -> SqsBackend:
        if cfg.queue.sqs is None:
            raise QueueError(f"{cfg.path}: [queue] backend = \"sqs\" needs [queue.sqs]")
        client = sqs_client(cfg.queue.sqs.region, cfg.queue.sqs.endpoint_url)
        directory = QueueDirectory(client, dict(cfg.queue.sqs.queues))
        node = cfg.agent.node
        return cls(
            SqsTransport(client, directory, redis_client, keys, node,
                         cfg.worker.visibility_timeout.total_seconds()),
            OutboxSink(redis_client, keys, cfg.record_ttl),
            OutboxDrainer(client, directory, redis_client, keys, node),
        )
