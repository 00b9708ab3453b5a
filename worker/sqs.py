"""Amazon SQS as the queue (``[queue] backend = "sqs"``; docs/sqs.md).

SQS only moves messages. Run records, leases, overlap locks, the delayed set and dead letters stay
in Redis, exactly as with the Redis Streams backend, so every guarantee the run state machine
gives (a finished run is never started again, a live run never twice) holds unchanged.

* :class:`SqsTransport`: the consumer's :class:`worker.transport.Transport` over SQS: strict
  priority receives, visibility extended by the heartbeat, delete once the run is recorded, and
  event messages from other systems normalised before ``parse_message`` judges them.
* The leader's enqueue goes through a Redis list, the outbox (:mod:`worker.outbox`), because the
  fenced claim must stay one Lua script and a script cannot call SQS.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import boto3
import redis
import structlog
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from scheduler.errors import QueueError
from scheduler.runs import from_epoch_ms, iso_utc
from worker.keys import Keys
from worker.messages import MAX_PAYLOAD_BYTES, is_version_1
from worker.queue import DEAD_LETTER_MAX, Delivery

# Every failure boto3 raises: service answers (ClientError) and transport/credential problems.
SQS_ERRORS: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
# ... plus a queue missing from [queue.sqs] queues: what a transport call may fail with.
QUEUE_FAILURES: tuple[type[Exception], ...] = (QueueError, BotoCoreError, ClientError)
# ReceiveMessage long-polls for at most 20 s.
MAX_WAIT_S = 20
# ReceiveMessage, ChangeMessageVisibilityBatch and SendMessageBatch take at most 10 messages.
MAX_BATCH = 10
# SQS refuses visibility timeouts above 12 h (and never extends past 12 h after a receive).
MAX_VISIBILITY_S = 12 * 3600
# A receipt handle is useless once its message became visible again, at most 12 h after the
# receive; side-map entries untouched (not received, not extended) for longer are dropped.
HANDLE_MAX_AGE_S = MAX_VISIBILITY_S + 60
# After an SQS error the fetch loop pauses this long (bounded by block_ms) instead of spinning.
ERROR_PAUSE_S = 1.0
# The attributes each delivery needs: the receive count (Delivery.deliveries) and the send time
# (the default scheduled_at of an event message).
RECEIVE_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp"]
# An SQS call that has not connected in this long will not; a read may take a full long poll.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = MAX_WAIT_S + 10
# boto3's "standard" retry mode with a few attempts: transient errors are retried inside the
# call; anything longer is the fetch loop's (or the drainer's) next round.
RETRY_ATTEMPTS = 3
# Connections kept to SQS: run threads delete and the heartbeat extends while the fetch loop
# long-polls and the drainer sends; more than boto3's default 10 avoids reconnect churn.
POOL_CONNECTIONS = 32


def sqs_client(region: str, endpoint_url: str | None) -> Any:
    """An SQS client; credentials come from boto3's standard chain (environment, shared files,
    instance or task role)."""
    return boto3.session.Session().client(
        "sqs", region_name=region, endpoint_url=endpoint_url,
        config=BotoConfig(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                          retries={"mode": "standard", "max_attempts": RETRY_ATTEMPTS},
                          max_pool_connections=POOL_CONNECTIONS))


@dataclass(frozen=True)
class SqsQueue:
    url: str
    fifo: bool
    max_receive: int | None  # the redrive policy's maxReceiveCount, if the queue has one


class QueueDirectory:
    """cronsul queue name -> SQS queue, resolved once (GetQueueUrl for names) and cached."""

    def __init__(self, client: Any, targets: Mapping[str, str]) -> None:
        self._client = client
        self._targets = dict(targets)
        self._known: dict[str, SqsQueue] = {}
        self._lock = threading.Lock()
        self._log = structlog.get_logger("cronsul.sqs")

    def get(self, queue: str) -> SqsQueue:
        """Raises QueueError for an unmapped queue and boto3 errors for an unreachable SQS."""
        with self._lock:
            known = self._known.get(queue)
        if known is not None:
            return known
        target = self._targets.get(queue)
        if target is None:
            raise QueueError(f"cronsul queue {queue!r} has no SQS queue in [queue.sqs] queues")
        url = target if "://" in target else str(
            self._client.get_queue_url(QueueName=target)["QueueUrl"])
        resolved = SqsQueue(url, url.endswith(".fifo"), self._max_receive(url))
        self._log.info("sqs_queue_resolved", queue=queue, url=url, fifo=resolved.fifo,
                       max_receive_count=resolved.max_receive)
        with self._lock:
            self._known[queue] = resolved
        return resolved

    def _max_receive(self, url: str) -> int | None:
        try:
            attrs = self._client.get_queue_attributes(
                QueueUrl=url, AttributeNames=["RedrivePolicy"]).get("Attributes", {})
            policy = json.loads(attrs["RedrivePolicy"]) if "RedrivePolicy" in attrs else {}
            return int(policy["maxReceiveCount"]) if "maxReceiveCount" in policy else None
        except (BotoCoreError, ClientError, ValueError, KeyError):
            return None  # only used for a log line; not worth failing the resolve


class SqsTransport:
    """Implements worker.transport.Transport over SQS.

    Priority: a short receive (WaitTimeSeconds = 0) on each open queue in priority order, the
    first that answers wins; only when all were empty does one long poll follow, on the open
    queues in turn (round robin). One ReceiveMessage can only wait on one queue; waiting always
    on the highest queue would leave the lower ones to short receives, which on SQS sample only
    some of its servers and can miss a sparse queue's messages for a while. Round robin gives
    every queue a full long poll regularly, at the cost of up to ``block_ms`` of latency for a
    higher queue's message that arrives during a lower queue's poll.

    ``Delivery.entry_id`` is the SQS MessageId (logs, dead letters); the receipt handle needed to
    delete or extend is kept in a side map keyed by (queue, MessageId).
    """

    acks_with_record = False

    def __init__(self, client: Any, directory: QueueDirectory, redis_client: redis.Redis,
                 keys: Keys, node: str, visibility_s: float,
                 monotonic: Callable[[], float] = time.monotonic,
                 pause: Callable[[float], None] = time.sleep) -> None:
        self._client = client
        self._dir = directory
        self._r = redis_client
        self._keys = keys
        self._node = node
        # Received messages stay invisible as long as a run lease lasts; the heartbeat extends.
        self._visibility = min(MAX_VISIBILITY_S, max(1, math.ceil(visibility_s)))
        self._monotonic = monotonic
        self._pause = pause
        self._handles: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._turn = 0
        self._log = structlog.get_logger("cronsul.sqs").bind(node=node)

    def ensure_groups(self, queues: Sequence[str]) -> None:
        """Resolve every queue now so a typo shows in the log at start (fetch retries later)."""
        for q in queues:
            try:
                self._dir.get(q)
            except QUEUE_FAILURES as exc:
                self._log.error("sqs_queue_unavailable", queue=q, error=str(exc)[:300])

    def fetch(self, queues: Sequence[str], free: int, block_ms: int,
              per_queue: Mapping[str, int] | None = None) -> list[Delivery]:
        def room(q: str) -> int:
            return min(free, per_queue.get(q, free)) if per_queue else free

        open_queues = [q for q in queues if room(q) > 0]
        if not open_queues:
            return []
        try:
            for q in open_queues:
                got = self._receive(q, room(q), 0)
                if got:
                    return got
            wait_s = min(MAX_WAIT_S, block_ms // 1000)
            if wait_s <= 0:
                return []
            q = open_queues[self._turn % len(open_queues)]
            self._turn += 1
            return self._receive(q, room(q), wait_s)
        except QUEUE_FAILURES as exc:
            self._log.warning("sqs_receive_failed", error=str(exc)[:300])
            self._pause(min(ERROR_PAUSE_S, block_ms / 1000))
            return []

    def _receive(self, queue: str, count: int, wait_s: int) -> list[Delivery]:
        sqs = self._dir.get(queue)
        reply = self._client.receive_message(
            QueueUrl=sqs.url, MaxNumberOfMessages=min(MAX_BATCH, count), WaitTimeSeconds=wait_s,
            VisibilityTimeout=self._visibility, MessageSystemAttributeNames=RECEIVE_ATTRIBUTES)
        now = self._monotonic()
        out: list[Delivery] = []
        for m in reply.get("Messages", []):
            attrs = m.get("Attributes", {})
            received = int(attrs.get("ApproximateReceiveCount", "1"))
            message_id = str(m["MessageId"])
            with self._lock:
                self._handles[(queue, message_id)] = (str(m["ReceiptHandle"]), now)
            if sqs.max_receive is not None and received >= sqs.max_receive:
                self._log.warning("sqs_final_receive", queue=queue, message_id=message_id,
                                  receive_count=received)
            body = str(m.get("Body", "")).encode("utf-8", "surrogateescape")
            out.append(Delivery(queue, message_id,
                                normalise_event(body, message_id, attrs.get("SentTimestamp")),
                                received))
        self._prune(now)
        return out

    def _prune(self, now: float) -> None:
        with self._lock:
            stale = [k for k, (_, seen) in self._handles.items() if now - seen > HANDLE_MAX_AGE_S]
            for k in stale:
                del self._handles[k]

    def reclaim(self, queues: Sequence[str], min_idle_ms: int, count: int) -> list[Delivery]:
        """Nothing to do: SQS delivers a message again by itself once its visibility lapses."""
        return []

    def extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        """ChangeMessageVisibilityBatch for every live run's message. A failure is logged, not
        raised: the Redis lease is what protects the run; a message that shows up again while
        its run lives is answered "busy" by ``begin`` and left alone."""
        timeout = min(MAX_VISIBILITY_S, max(1, math.ceil(seconds)))
        now = self._monotonic()
        by_queue: dict[str, list[tuple[str, str]]] = {}
        with self._lock:
            for d in deliveries:
                known = self._handles.get((d.queue, d.entry_id))
                if known is not None:
                    self._handles[(d.queue, d.entry_id)] = (known[0], now)
                    by_queue.setdefault(d.queue, []).append((d.entry_id, known[0]))
        self._in_batches(by_queue, "extend", lambda url, chunk: (
            self._client.change_message_visibility_batch(
                QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": handle,
                                        "VisibilityTimeout": timeout}
                                       for i, (_, handle) in enumerate(chunk)])))

    def settle(self, delivery: Delivery) -> None:
        self.settle_many([delivery])

    def settle_many(self, deliveries: Sequence[Delivery]) -> None:
        """DeleteMessageBatch, up to 10 messages a call (one DeleteMessage per run made a busy
        node's slots come back slowly). A failed delete is logged: the message comes back after
        its visibility timeout and ``begin`` answers it "done" (the run is recorded), so it is
        deleted then."""
        by_queue: dict[str, list[tuple[str, str]]] = {}
        with self._lock:
            for d in deliveries:
                known = self._handles.pop((d.queue, d.entry_id), None)
                if known is None:
                    self._log.warning("sqs_settle_unknown", queue=d.queue, message_id=d.entry_id)
                    continue
                by_queue.setdefault(d.queue, []).append((d.entry_id, known[0]))
        self._in_batches(by_queue, "delete", lambda url, chunk: self._client.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": handle}
                                   for i, (_, handle) in enumerate(chunk)]))

    def _in_batches(self, by_queue: dict[str, list[tuple[str, str]]], action: str,
                    call: Callable[[str, list[tuple[str, str]]], Any]) -> None:
        """``call(queue url, chunk)`` for each queue's (message id, receipt handle) pairs,
        MAX_BATCH at a time. A failed call (``sqs_<action>_failed``) and each entry SQS refused
        (``sqs_<action>_refused``) are logged, not raised: see :meth:`extend` and
        :meth:`settle_many` for why that is safe."""
        for queue, items in by_queue.items():
            for start in range(0, len(items), MAX_BATCH):
                chunk = items[start:start + MAX_BATCH]
                try:
                    reply = call(self._dir.get(queue).url, chunk)
                except QUEUE_FAILURES as exc:
                    self._log.warning(f"sqs_{action}_failed", queue=queue,
                                      message_ids=[m for m, _ in chunk], error=str(exc)[:300])
                    continue
                for failed in reply.get("Failed", []):
                    self._log.warning(f"sqs_{action}_refused", queue=queue,
                                      message_id=chunk[int(failed["Id"])][0],
                                      code=failed.get("Code"))

    def dead_letter(self, delivery: Delivery, reason: str, error: str) -> None:
        """Record the message in cronsul's dead-letter stream (in Redis, same fields as the
        Redis backend's, entry_id = MessageId), then delete it from SQS. Record first: a crash in
        between re-delivers it and it is recorded again, never lost."""
        self._r.xadd(
            self._keys.dead,
            {"reason": reason, "error": error[:4096], "queue": delivery.queue,
             "entry_id": delivery.entry_id, "node": self._node,
             "payload": (delivery.payload or b"")[:65536]},
            maxlen=DEAD_LETTER_MAX, approximate=True,
        )
        self.settle(delivery)


def normalise_event(body: bytes, message_id: str, sent_ms: str | None) -> bytes:
    """Fill in what an event message (from another system, directly or through SNS) may omit:
    ``run_id`` defaults to ``<job>@event-<SQS MessageId>`` (the same message delivered again
    is the same run) and ``scheduled_at`` to the time SQS received it. An SNS envelope (a
    subscription without raw message delivery) is unwrapped. Anything that is not a version 1
    message naming a job is passed on untouched: ``parse_message`` gives the reason."""
    if len(body) > MAX_PAYLOAD_BYTES:
        return body
    try:
        value = json.loads(body)
        if (isinstance(value, dict) and value.get("Type") == "Notification"
                and isinstance(value.get("Message"), str) and "TopicArn" in value):
            body = value["Message"].encode("utf-8", "surrogateescape")
            value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: parse_message says
        return body
    if not isinstance(value, dict) or not is_version_1(value) or not isinstance(value.get("job"),
                                                                                  str):
        return body
    changed = False
    if value.get("run_id") is None:
        value["run_id"] = f"{value['job']}@event-{message_id}"
        changed = True
    if value.get("scheduled_at") is None and sent_ms is not None and sent_ms.isdigit():
        value["scheduled_at"] = iso_utc(from_epoch_ms(int(sent_ms)))
        changed = True
    if not changed:
        return body
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate somewhere: parse_message dead-letters it
        return body
