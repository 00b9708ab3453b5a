"""The small protocols through which the pure scheduler talks to the world."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from scheduler.runs import Run


@dataclass(frozen=True, order=True)
class Fence:
    """A sequencer that only grows across leaders.

    ``index`` is the leader key's ModifyIndex right after our acquire. ``epoch`` is raised only
    when Consul's index went backwards (its state was lost or restored): see docs/architecture.md.
    Ordering is lexicographic (epoch first), which ``order=True`` gives us.
    """

    epoch: int
    index: int


@dataclass(frozen=True)
class TickBatch:
    """Everything one scheduler pass writes, applied in one atomic, fenced step."""

    runs: Sequence[tuple[Run, str]]  # (run, queue name)
    cursors: Mapping[str, datetime]  # job -> newest scheduled time handled (enqueued or missed)
    # The sink's own encoding of runs and cursors, made ahead of the tick by ``Sink.prepare``
    # (opaque to the scheduler; a sink ignores an encoding that is not its own).
    encoded: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EnqueueResult:
    enqueued: int
    deduplicated: int


class Lease(Protocol):
    """The leader's local lease: valid until a deadline on the monotonic clock."""

    def valid(self) -> bool: ...


class Sink(Protocol):
    """Where due ticks go. Implementations refuse a batch whose fence is below the highest seen."""

    def prepare(self, batch: TickBatch) -> TickBatch:
        """The same batch with its encoding done (no I/O), so ``apply`` at the tick only writes."""
        ...

    def apply(self, batch: TickBatch, fence: Fence) -> EnqueueResult: ...


class CursorStore(Protocol):
    """Reads each job's cursor: the newest scheduled time already handled (None: never seen)."""

    def load_cursors(self, jobs: Sequence[str]) -> Mapping[str, datetime | None]: ...

    def load_schedules(self, jobs: Sequence[str]) -> Mapping[str, str | None]:
        """The schedule each job's cursor was kept under (``ScheduledJob.schedule_key``), or
        None when unknown."""

    def save_schedules(self, schedules: Mapping[str, str]) -> None: ...
