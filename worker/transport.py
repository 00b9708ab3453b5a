"""What the consumer needs from a queue backend (Redis Streams or Amazon SQS).

Run state (records, leases, locks, the delayed set) always lives in Redis; a transport only
moves messages. The Redis transport acks inside the run-state scripts (``acks_with_record``), so
recording a result and acking it are one atomic step. SQS cannot join a Redis script: its
deliveries carry no entry id, and the consumer settles (deletes) them after the record is written;
a delete lost in between only causes a re-delivery that ``begin`` answers with "done".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from worker.queue import Delivery


class Transport(Protocol):
    acks_with_record: bool

    def ensure_groups(self, queues: Sequence[str]) -> None: ...

    def fetch(self, queues: Sequence[str], free: int, block_ms: int,
              per_queue: Mapping[str, int] | None = None) -> list[Delivery]: ...

    def reclaim(self, queues: Sequence[str], min_idle_ms: int, count: int) -> list[Delivery]: ...

    def settle(self, delivery: Delivery) -> None:
        """The run behind this delivery is recorded: remove the message for good."""

    def settle_many(self, deliveries: Sequence[Delivery]) -> None:
        """:meth:`settle` for several deliveries, in as few calls as the backend allows."""

    def extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        """Keep these in-flight messages invisible to other consumers for ``seconds`` more."""

    def dead_letter(self, delivery: Delivery, reason: str, error: str) -> None: ...
