"""The one error hierarchy of cronsul (dramatiq-style: clear nouns, one root).

Every error message is built from identifiers (file, job, key, run id) so an operator can act
on it without reading code. Callers chain the cause with ``raise ... from exc``.
"""

from __future__ import annotations


class CronsulError(Exception):
    """Root of every error cronsul raises on purpose."""


class ConfigError(CronsulError):
    """A configuration file, job definition or CLI argument is invalid (exit code 2)."""


class ScheduleError(ConfigError):
    """A schedule expression or time zone cannot be understood."""


class LeadershipLost(CronsulError):
    """The local lease ran out or Consul says another session holds the leader key."""


class ClockAhead(CronsulError):
    """The leader's clock is ahead of Redis's: a pass would enqueue ticks early and move the
    cursors into the future (runs early, then none until real time catches up)."""


class FencedOff(LeadershipLost):
    """A write carried a fence token lower than the highest one already seen downstream."""


class ConnectionFailure(CronsulError):
    """Consul or Redis cannot be reached (exit code 3)."""


class QueueError(CronsulError):
    """The work queue refused or lost an operation."""


class MessageError(QueueError):
    """A queued message cannot be run (undecodable, unknown job, bad parameters)."""


class NotRunnableHere(MessageError):
    """A queued message this node's config cannot run (an unknown job, a parameter the job does
    not declare) but another node's may: while a config change rolls out, nodes disagree."""
