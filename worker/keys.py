"""Every Redis key cronsul uses, in one place. Names are built only from validated identifiers."""

from __future__ import annotations

from dataclasses import dataclass

# The consumer group every node joins on every queue stream.
GROUP = "cronsul"


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def fence(self) -> str:
        """Hash {epoch, index}: the highest fence token any leader has written with."""
        return f"{self.prefix}:fence"

    def run(self, run_id: str) -> str:
        """Hash: the run record; its creation (HSETNX state) is the run id's one-time claim."""
        return f"{self.prefix}:run:{run_id}"

    def lease(self, run_id: str) -> str:
        """String: the executing node's token, with a PX expiry renewed by heartbeat."""
        return f"{self.prefix}:lease:{run_id}"

    @property
    def schedules(self) -> str:
        """Hash: job -> the schedule its cursor was kept under (expression|zone)."""
        return f"{self.prefix}:schedules"

    def cursor(self, job: str) -> str:
        """String: epoch ms of the newest scheduled tick of ``job`` already handled."""
        return f"{self.prefix}:cursor:{job}"

    def stream(self, queue: str) -> str:
        return f"{self.prefix}:q:{queue}"

    def lock(self, name: str) -> str:
        """String "<run_id> <token>": the overlap lock of a job (or of one lock_key value)."""
        return f"{self.prefix}:lock:{name}"

    def waiting(self, name: str) -> str:
        """String: the one run id waiting for an overlap lock (overlap = queue | replace)."""
        return f"{self.prefix}:waiting:{name}"

    def stop(self, run_id: str) -> str:
        """String: present when a newer run asked this one to stop (overlap = replace)."""
        return f"{self.prefix}:stop:{run_id}"

    @property
    def delayed(self) -> str:
        """Sorted set "<queue>|<payload>" by due time (ms): retries and waiting runs."""
        return f"{self.prefix}:delayed"

    @property
    def dead(self) -> str:
        """Stream of dead letters: reason, error, payload."""
        return f"{self.prefix}:dlq"

    def live(self, run_id: str, attempt: int) -> str:
        """Stream, PEXPIRE: one attempt's output while it runs (entries ``o`` = offset in the
        attempt's output, ``d`` = bytes), for ``cronsul logs --follow`` (worker/live.py)."""
        return f"{self.prefix}:live:{run_id}:{attempt}"

    def live_want(self, run_id: str) -> str:
        """String, PX: present while a ``cronsul logs --follow`` watches the run; only then
        does its node publish the run's live output."""
        return f"{self.prefix}:live-want:{run_id}"

    def history(self, job: str) -> str:
        """Sorted set of run ids by finish time, for ``cronsul history``."""
        return f"{self.prefix}:hist:{job}"

    @property
    def last_success(self) -> str:
        """Hash job -> finish time (ms) of its newest succeeded run."""
        return f"{self.prefix}:last_success"

    @property
    def outbox(self) -> str:
        """List (SQS backend): runs claimed in Redis, waiting to be sent to SQS. Items are
        "<queue>|<payload>", or "<queue>~<due ms>|<payload>" for a promoted delayed run."""
        return f"{self.prefix}:outbox"

    @property
    def outbox_lock(self) -> str:
        """String, PX: the token of the node currently sending the outbox to SQS."""
        return f"{self.prefix}:outbox:lock"
